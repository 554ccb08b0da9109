"""deepserve's benchmark: the server measured side by side with its two ceilings in one run.

Absolute numbers on a shared 2-core machine mean little; a ratio against a ceiling measured minutes apart on the
same machine, with the same load generator, says how much of the available speed the server keeps. So every result
here is reported next to a ceiling: the transport ceiling (a bare grpc.aio server that answers a fixed reply without
decoding, `bench.ceiling_server`) and the compute ceiling (raw onnxruntime in-process, `bench.compute`).
"""
