"""Triton kernels of the step ops (placeholder)."""
from __future__ import annotations


def status() -> tuple[bool, str]:
    return False, "triton kernels not implemented yet"
