"""Everything that touches shard files: specs and reading, the output format, the writer, training pairs,
text cleaning, the synthetic corpus. No model here."""
