"""``--help`` in plain text: docstrings lose their reStructuredText markup, every flag shows its default.

Used by every subcommand: the LightningCLI ones (:class:`PlainJsonargparseFormatter`, whose descriptions come from the
docstrings of the model, the data modules and Lightning's Trainer) and the argparse ones (:class:`PlainHelpFormatter`).
"""

from __future__ import annotations

import argparse
import re

from jsonargparse import DefaultHelpFormatter

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^`>]*>)?`")  # :class:`~a.b.C` -> C, :func:`x <y>` -> x
_LITERAL = re.compile(r"``([^`]+)``")  # ``code`` -> code
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_+")  # `text <url>`_ -> text
_DIRECTIVE = re.compile(r"\.\. [a-z-]+::\s*")  # .. warning:: (the text after it stays)


def plain_text(text: str) -> str:
    """Docstring text without reStructuredText markup (roles, double-backtick literals, links)."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1] if "~" in m.group(0) else m.group(1), text)
    text = _DIRECTIVE.sub("", _LINK.sub(r"\1", text))
    return _LITERAL.sub(r"\1", text)


class PlainJsonargparseFormatter(DefaultHelpFormatter):
    """jsonargparse's formatter (types and defaults of every flag), with docstring markup removed."""

    def _get_help_string(self, action) -> str:
        return plain_text(super()._get_help_string(action))

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def start_section(self, heading) -> None:  # group titles are docstring first lines
        super().start_section(plain_text(heading) if heading else heading)


class PlainHelpFormatter(argparse.HelpFormatter):
    """argparse help with the default of every flag that has one (unless its help already says it), in plain text."""

    def _get_help_string(self, action) -> str:
        text = plain_text(action.help or "")
        default = action.default
        flag_only = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction)
        has_default = (default is not None and default is not argparse.SUPPRESS and not isinstance(action, flag_only)
                       and action.option_strings)
        if has_default and "%(default)" not in text and "default" not in text.lower():
            text += (" " if text else "") + "(default: %(default)s)"
        return text

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))
