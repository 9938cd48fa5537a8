"""The public API: what kvmio exports exists, is documented, and ships its type marker."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import kvmio


def _public_modules() -> list[str]:
    names = ["kvmio"]
    for m in pkgutil.walk_packages(kvmio.__path__, "kvmio."):
        if not any(part.startswith("_") for part in m.name.split(".")[1:]):
            names.append(m.name)
    return names


def test_exports_exist() -> None:
    assert len(kvmio.__all__) == len(set(kvmio.__all__))
    for name in kvmio.__all__:
        assert hasattr(kvmio, name), name


def test_every_public_name_has_a_docstring() -> None:
    missing = []
    checked = 0
    for modname in _public_modules():
        mod = importlib.import_module(modname)
        if not (mod.__doc__ or "").strip():
            missing.append(modname)
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != modname:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                checked += 1
                if not (obj.__doc__ or "").strip():
                    missing.append(f"{modname}.{name}")
                if inspect.isclass(obj):
                    for mname, member in vars(obj).items():
                        if mname.startswith("_"):
                            continue
                        fn = member.fget if isinstance(member, property) else member
                        if inspect.isfunction(fn) or isinstance(member, property):
                            checked += 1
                            # An override may inherit its base class's docstring, as help()
                            # shows it.
                            doc = fn.__doc__ or _inherited_doc(obj, mname)
                            if not doc.strip():
                                missing.append(f"{modname}.{name}.{mname}")
    assert missing == []
    assert checked > 200  # the walk really covered the package


def test_errors_share_one_base() -> None:
    from kvmio import errors

    for name, obj in vars(errors).items():
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert issubclass(obj, kvmio.KvmError) and issubclass(obj, OSError), name


def test_typed_marker_is_installed() -> None:
    assert (Path(kvmio.__file__).parent / "py.typed").exists()


def _inherited_doc(cls: type, name: str) -> str:
    for base in cls.__mro__[1:]:
        member = vars(base).get(name)
        if member is not None:
            fn = member.fget if isinstance(member, property) else member
            return getattr(fn, "__doc__", None) or ""
    return ""
