"""Offloading decisions by name: which experts stay on the GPU, where a missing one runs, what is evicted."""

from __future__ import annotations

from moeflow import MoeflowError
from moeflow.policy.auto import AutoPolicy, AutoPrefetchPolicy
from moeflow.policy.base import OffloadPolicy
from moeflow.policy.fiddler import FiddlerPolicy
from moeflow.policy.fmoe import FmoePolicy
from moeflow.policy.lru import LruPolicy
from moeflow.policy.reference import CpuPolicy, GpuPolicy

POLICIES: dict[str, type[OffloadPolicy]] = {p.name: p for p in (AutoPolicy, FiddlerPolicy, LruPolicy, GpuPolicy,
                                                                  CpuPolicy, FmoePolicy, AutoPrefetchPolicy)}


def get_policy(name: str) -> OffloadPolicy:
    if name not in POLICIES:
        raise MoeflowError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()
