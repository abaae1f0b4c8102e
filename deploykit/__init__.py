"""deploykit: make neural-network pruning pay off at deployment time.

The library is a chain of public functions (docs/python-api.md): build a model from its `ModelSpec`, prune it
with a `PruningPlan`, strip the masks, convert it to a deployable form, export and check it, run and
measure it. This package's top level imports nothing heavy; import the submodules you use.
"""

__version__ = "0.1.0"
