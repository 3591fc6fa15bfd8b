"""The built-in training corpus: English prose that is on every machine that runs hometrain.

Python's own documentation strings ship with every interpreter, so the demo and the tests
train on them with no download. Real runs pass their own data instead.
"""

from __future__ import annotations

import importlib
import inspect

MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "http.server",
    "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "math",
    "mimetypes", "multiprocessing", "numbers", "operator", "optparse", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "smtplib", "socket",
    "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest",
    "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile", "zlib",
)


def builtin_documents() -> list[str]:
    """Docstrings of the standard library's modules and their public members, one per document.

    Deterministic for a given Python release: modules and members are visited in sorted order.
    """
    documents: list[str] = []
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a stripped-down interpreter; the rest still makes a corpus
            continue
        doc = inspect.getdoc(module)
        if doc:
            documents.append(doc)
        for name in sorted(vars(module)):
            if name.startswith("_"):
                continue
            member = getattr(module, name)
            if getattr(member, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(member)
            if doc and len(doc) >= 80:
                documents.append(doc)
    return documents
