"""Which weights or channels to zero: pruning plans and the pruner registry (magnitude, random,
structured L1/L2/FPGM, SNIP/GraSP/SynFlow, IMP with rewinding), torch-pruning's coupled channel
groups and the block handlers for layers it cannot see, and mask stripping.

May import `deploykit.model` and `deploykit.core`.
"""
