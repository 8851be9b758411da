"""The private or version-dependent torch APIs stagerun relies on, each behind one small function.

Supported: torch 2.11 (the GPU machines) through 2.14. Every entry says which versions need which path, so a torch
upgrade touches this file only.
"""

from __future__ import annotations
