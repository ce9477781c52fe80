"""Source adapters: one module per kind of image collection, each class registered by name.

``base.py`` says what a source is and keeps the registry; a new kind is one
module here holding one class decorated with :func:`register`. Every module of
this package is imported below, so nothing else in the project names the kinds.
"""

import importlib
import pkgutil

from .base import IMAGE_EXTENSIONS, SOURCES, Source, open_named, open_source, register, row_of, source_class, source_kinds, \
    state_hash
from .fashion_mnist import FashionMNISTSource, read_idx
from .folder import ImageFolderSource, ImageNetSource, class_folders, linked_folders
from .hf import HFSource
from .wds import WebDatasetSource

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["IMAGE_EXTENSIONS", "SOURCES", "Source", "open_named", "open_source", "register", "row_of", "source_class",
           "source_kinds", "state_hash", "FashionMNISTSource", "read_idx", "ImageFolderSource", "ImageNetSource",
           "class_folders", "linked_folders", "HFSource", "WebDatasetSource"]
