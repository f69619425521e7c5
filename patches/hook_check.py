"""The plugin knows what it patched: the SGLang it runs in is the one its hooks were written
for, and every hook it registered was applied.

SGLang logs and goes on when a plugin's `register()` raises or when a hook cannot be applied
to its target (`HookRegistry.apply_hooks`), which would leave a half-patched server: a KV pool
sized by one hook and freed without the other leaks memory at run time. So the checks run where
an error does stop SGLang:

- ServerArgs.check_server_args (AFTER): in the server's main process, right after the plugins
  were loaded and their hooks applied, before any model is built.
- ModelRunner.__init__ (BEFORE): in every scheduler process, before its model is built.

A wrong SGLang version is found in `register()`, which then registers only this check, so it
refuses in those places with one line instead of patching functions it does not know.
"""

from __future__ import annotations

SGLANG_VERSION = "0.5.23"  # every hook target is pinned by tests/unit/test_upstream_guards.py
CHECK_ARGS = "sglang.srt.server_args.ServerArgs.check_server_args"
RUNNER_INIT = "sglang.srt.model_executor.model_runner.ModelRunner.__init__"
PLUGIN_PACKAGE = "sglang_evict"


class PluginCheckError(RuntimeError):
    """SGLang is not the version the plugin was written for, or a hook was not applied."""


def installed_sglang() -> str:
    from importlib.metadata import version

    return version("sglang")


def version_refusal(installed: str | None = None) -> str | None:
    """One line if the installed SGLang is not the pinned one, else None."""
    installed = installed_sglang() if installed is None else installed
    if installed == SGLANG_VERSION:
        return None
    return (f"sglang-evict is written for sglang {SGLANG_VERSION}, and sglang {installed} is "
            f"installed: its hooks would patch functions they do not know "
            f"(pip install sglang=={SGLANG_VERSION})")


def own_targets(registry) -> list[str]:
    """The targets that hold at least one hook of this plugin."""
    return sorted(
        target for target, hooks in registry._hooks.items()
        if any(getattr(hook, "__module__", "").startswith(PLUGIN_PACKAGE) for _, hook, _ in hooks)
    )


def unapplied(registry) -> list[str]:
    """The plugin's targets that `apply_hooks` did not patch (it logs and skips a failure)."""
    return [t for t in own_targets(registry) if t not in registry._patched]


def check(registry=None, installed: str | None = None) -> None:
    """PluginCheckError with one line if SGLang is another version or a hook is missing."""
    why = version_refusal(installed)
    if why is None:
        if registry is None:
            from sglang.srt.plugins.hook_registry import HookRegistry as registry
        missing = unapplied(registry)
        if missing:
            why = (f"{len(missing)} of its hooks were not applied ({', '.join(missing)}): "
                   "refusing to serve half-patched")
    if why is not None:
        raise PluginCheckError(f"sglang-evict: {why}")


def after_check_server_args(result, *args, **kwargs):
    check()
    return result


def before_model_runner_init(*args, **kwargs):
    check()
    return None


def register(registry, hook_type) -> None:
    registry.register(CHECK_ARGS, after_check_server_args, hook_type.AFTER)
    registry.register(RUNNER_INIT, before_model_runner_init, hook_type.BEFORE)
