"""Opacus-compatible helpers under the module paths Opacus scripts import them from
(``opacus.utils.batch_memory_manager`` -> ``dpfast.utils.batch_memory_manager``)."""
