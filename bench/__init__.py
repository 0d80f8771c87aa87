"""Benchmarks: kubenova measured against raw libvirt in the same run."""
