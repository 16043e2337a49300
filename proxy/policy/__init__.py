"""Policy files: YAML loading with source positions, path parsing and compilation."""

from proxy.policy.compiler import CompiledElement, CompiledPolicy, ResourcePolicy, compile_policy
from proxy.policy.loader import PolicyError, load_policy

__all__ = ["CompiledElement", "CompiledPolicy", "PolicyError", "ResourcePolicy", "compile_policy", "load_policy"]
