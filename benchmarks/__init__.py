"""Benchmarks of a real streamsrv process: live word and final lag, WER against offline, CPU,
memory and audio loss under concurrent real-time calls. Run `python -m benchmarks --help`.

Measured from outside the server on purpose (subprocess, Redis, /metrics, /proc), never from
timed unit tests: these are the figures an operator would see.
"""
