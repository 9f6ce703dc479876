"""wsdeploy: a deployment compiler for weight-sampled neural networks (WSNet)."""

from __future__ import annotations

__version__ = "0.1.0"
