"""The CapFilt pass: shards in, captioner and filter over batches, cleaned shards out; selection, shard claims,
the local launcher, and what is read back from an output (stats, report, re-selection)."""
