"""The fleet: benchmarking the same configurations on several machines of a Ray cluster (optional extra
`deploykit[fleet]`). `cluster` is the machines, `fanout` the run."""
