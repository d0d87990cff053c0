"""The sources file (SMARTCOVER_SOURCES_FILE): read at start-up, refused with reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.sources import SourceKind, SourcesError, load_sources


def test_sources_are_read_with_their_kinds_secrets_and_allow_lists(tmp_path: Path) -> None:
    path = tmp_path / "sources.toml"
    path.write_text(
        '[sources.ct]\nkind = "ctwing"\ntoken = "t0k3n"\nallow = ["10.0.0.0/8", "::1/128"]\n'
        '[sources.one]\nkind = "onenet"\ntoken = "x"\naes_key = "a2V5"\nmodel = "v1"\n'
    )
    sources = load_sources(path)
    assert sources["ct"].kind is SourceKind.CTWING
    assert "t0k3n" not in repr(sources["ct"])  # a secret is never printed
    assert [sources["ct"].allows(a) for a in ("10.1.2.3", "::1", "192.168.1.1", None)] == [
        True,
        True,
        False,
        False,
    ]
    assert sources["one"].allows("192.168.1.1")  # no list: any address
    assert load_sources(None) == {}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '[sources.a]\nkind = "ctwing"\n',
            "sources.a: table: Value error, a ctwing source needs a token",
        ),
        ('[sources.a]\nkind = "mqtt"\ntoken = "x"\n', "sources.a: kind: Input should be"),
        ('[sources.a]\nkind = "iotda"\ntoken = "x"\ntokn = "y"\n', "sources.a: tokn: Extra inputs"),
        (
            '[sources.a]\nkind = "iotda"\ntoken = "x"\nallow = ["10.0.0.300/8"]\n',
            "sources.a: allow.0",
        ),
        ('[sources.a]\nkind = "iotda"\ntoken = "x"\naes_key = "k"\n', "aes_key is for onenet"),
        (
            '[sources."a b"]\nkind = "iotda"\ntoken = "x"\n',
            "sources.a b: name: String should match",
        ),
        ('[source.a]\nkind = "iotda"\n', "expected only [sources.<name>] tables"),
        ("[sources.a\n", "cannot read it"),
    ],
)
def test_a_bad_sources_file_is_refused_naming_source_and_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "sources.toml"
    path.write_text(text)
    with pytest.raises(SourcesError) as refused:
        load_sources(path)
    assert str(refused.value).startswith(f"{path}: ")
    assert problem in str(refused.value)
