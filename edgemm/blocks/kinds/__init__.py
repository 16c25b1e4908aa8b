"""The block kinds' specs (edgemm.blocks.spec): one module per block module of edgemm.blocks, no torch."""
