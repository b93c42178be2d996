"""The agent backend's protocol, the one place to change it: the run models (``models``),
the httpx client with its deadlines, retries and size caps (``client``, ``http``,
``answer``) and its errors (``errors``).

It sits below ``workers`` (whose cleanup jobs call the backend) and beside ``persistence``,
and imports only ``cache``; nothing in it knows RQ, Redis or Postgres. ``agent_sessions``
re-exports what a workflow engine uses.
"""
