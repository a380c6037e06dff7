"""How every export writes numbers and YAML, so each format parses back to the same floats."""

from __future__ import annotations

from typing import Sequence

from ..errors import ChameleonUserError

__all__ = ["format_weight", "dump_yaml", "comment_header", "reads_as_number"]


def format_weight(weight: float) -> str:
    """Python's shortest round-trip representation: ``float()`` of it is the same double."""
    return repr(float(weight))


def reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def comment_header(lines: Sequence[str]) -> str:
    return "".join(f"# {line}\n" for line in lines)


def dump_yaml(doc, header_lines: Sequence[str] = ()) -> str:
    """``doc`` as block YAML (keys in insertion order, list items indented under their key, as
    people write them), after a comment header. pyyaml writes floats with ``repr``, so they
    parse back bit for bit."""
    try:
        import yaml
    except ImportError as exc:  # pyyaml is a dependency; this is for a broken install
        raise ChameleonUserError("writing YAML needs the package 'pyyaml' (pip install pyyaml)") from exc

    class Indented(yaml.SafeDumper):
        def increase_indent(self, flow=False, indentless=False):
            return super().increase_indent(flow, False)

    body = yaml.dump(doc, Dumper=Indented, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return comment_header(header_lines) + body
