"""How an option is defined: the flag that sets it (kind, default, choices,
help text, help group), kept as metadata on its field of `tl_keras.config`'s
dataclasses."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """How one option is set from the command line.

    `kind` names the absl definer (`string`, `integer`, `float`, `boolean`,
    `enum`, `list`); `choices` is set for `enum` only; `group` is the heading
    `--helpshort` lists the flag under.
    """
    kind: str
    default: object
    help: str
    group: str
    choices: tuple = ()


class OptionGroup:
    """Makes the fields of the options `--helpshort` lists under one heading.

    Each method returns a `dataclasses.field` with no default of its own, its
    flag's `FlagSpec` under the metadata key `flag`; the methods are named, and
    take their arguments in the order of, absl's `DEFINE_*`.
    """

    def __init__(self, title):
        self.title = title

    def _field(self, kind, default, help, choices=()):
        spec = FlagSpec(kind=kind, default=default, help=help, group=self.title,
                        choices=tuple(choices))
        return dataclasses.field(metadata={"flag": spec})

    def string(self, default, help):
        return self._field("string", default, help)

    def integer(self, default, help):
        return self._field("integer", default, help)

    def float(self, default, help):
        return self._field("float", default, help)

    def boolean(self, default, help):
        return self._field("boolean", default, help)

    def enum(self, default, choices, help):
        return self._field("enum", default, help, choices)

    def list(self, default, help):
        return self._field("list", default, help)


def flag_spec(field):
    """The `FlagSpec` of a field made by an `OptionGroup` (each of
    `dataclasses.fields(tl_keras.config.Config)`, say)."""
    return field.metadata["flag"]
