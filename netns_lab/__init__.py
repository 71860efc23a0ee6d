"""Network-namespace lab for the INC switch: see topology.Lab and the inc-lab CLI."""

from .errors import LabConfigError, LabError
from .topology import Lab, state_path, status, teardown

__all__ = ["Lab", "LabError", "LabConfigError", "state_path", "status", "teardown"]
