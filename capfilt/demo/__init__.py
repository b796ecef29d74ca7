"""The offline demo: BLIP's whole bootstrapping loop on the bundled COCO corpus (`capfilt demo`).

A program made of library calls, like the two programs it drives; the corpus ships beside it (`shards/`)."""
