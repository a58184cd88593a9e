"""Griffe extension for the API reference: the docstrings use Sphinx roles (:func:`patch`); render
each as inline code (`patch`) so the Markdown pages do not show the role markup."""

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|attr|mod|data|obj|exc):`~?([^`]+)`")


class RstRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
