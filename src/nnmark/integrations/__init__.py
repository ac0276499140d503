"""Thin adapters that run nnmark's scheme hooks inside other training frameworks."""
