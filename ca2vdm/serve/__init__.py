"""``ca2vdm serve``: generated video streamed live to several browsers at once.

``protocol.py`` what a client may send and the binary chunk format; ``scheduler.py`` the one
worker thread that owns all model work and batches the streams; ``app.py`` the FastAPI app (page,
JSON API, WebSocket) and ``serve()``. The page itself is package data: ``ca2vdm/assets/static/``.
"""
