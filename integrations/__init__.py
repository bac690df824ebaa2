"""Thin model adapters (installed as ``eos_kernels.integrations``)."""
