"""The worker side: inc-agent, and the Python API (`from hostagent import
Communicator`, see communicator.py), imported on first use."""


def __getattr__(name):
    if name in ("Communicator", "CommError"):
        from . import communicator

        return getattr(communicator, name)
    raise AttributeError(f"module 'hostagent' has no attribute {name!r}")
