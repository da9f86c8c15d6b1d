"""The strict YAML reader of config files and key=value overrides: a key written twice, nesting deeper than a config
can be, and every PyYAML error become one line naming the file (or override) and the line."""
import yaml


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice (PyYAML silently keeps the last one)."""
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key in (k for k, _ in node.value if isinstance(k, yaml.ScalarNode)):
            if key.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key.value!r}", key.start_mark)
            seen.add(key.value)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, where: str) -> object:
    """Parsed YAML, or one ValueError line naming where (and the line) instead of PyYAML's multi-line report."""
    try:
        depth = 0  # PyYAML's composer recurses (a deep nesting overflows the stack); its event stream does not
        for event in yaml.parse(text, Loader=StrictLoader):
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > 3:  # a config is a mapping, its loss section and lists
                raise ValueError(f"{where} line {event.start_mark.line + 1}: nested deeper than a config can be (a "
                                 "mapping, its loss section, a list): fix the YAML")
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        opened = f" ({e.context} at line {ctx.line + 1})" if ctx and e.context else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ValueError(f"{where}{at}: {problem}{opened}: fix the YAML") from None


class _Dumper(yaml.SafeDumper):
    """SafeDumper writing a string with a line break double-quoted on one line ("a\nb"), not folded over lines."""


_Dumper.add_representer(str, lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s,
                                                                        style='"' if "\n" in s else None))


def dump_yaml(data: dict) -> str:
    """`data` as YAML in its own key order, readable back by parse_yaml (the run folder's config.yaml, print-config)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=1 << 20)  # one line per key
