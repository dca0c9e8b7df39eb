"""OpenAI-compatible serving on the distributed runtime: `torchrun -m runtime.serve`.

    __main__.py        entry: load the model on every rank; rank 0 also runs the HTTP server and scheduler
    scheduler.py       rank 0's loop (plans broadcast to every rank) and the other ranks' loop
    http.py            routes, API key, JSON and server-sent events (standard library)
    chat.py            /v1/chat/completions requests and answers
    responses.py       /v1/responses requests and answers
    fields.py          request field checks and OpenAI-style errors
    harmony_stream.py  generated tokens -> reasoning / text / tool-call parts, incrementally
    job.py             what both APIs reduce to
The model side of continuous batching is runtime/continuous.py.
"""
