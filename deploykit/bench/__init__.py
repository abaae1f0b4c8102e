"""Benchmarking: what a run is asked to do (`settings`), the orchestration that exports each
configuration and compares it with its reference (`runner`), the interleaved worker processes that
measure (`interleave`, `worker`), and the records written to disk (`records`).

May import `deploykit.export` and everything below it.
"""
