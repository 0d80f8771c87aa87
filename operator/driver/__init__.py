"""The node-local compute driver: Nova's ComputeDriver contract and its implementations."""
