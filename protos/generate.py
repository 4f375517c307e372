"""Generate the Python gRPC stubs, or the API reference, from protos/plaudit/**.proto.

Run ``python protos/generate.py`` after editing a .proto file; the stubs are committed beside
the sources. ``--out DIR`` writes elsewhere (the staleness test compares the two).
``--docs docs/api.md`` renders every service, RPC, message, field and enum with the comments
of the .proto files instead (tests/test_docs.py checks the committed file is not stale).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2

PROTO_ROOT = Path(__file__).resolve().parent


def proto_files() -> list[Path]:
    """All .proto sources under protos/plaudit, sorted for a stable order."""
    return sorted(PROTO_ROOT.glob("plaudit/**/*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the files it wrote."""
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return sorted(p for p in out_dir.rglob("*_pb2*.py*") if p.is_file())


def describe() -> descriptor_pb2.FileDescriptorSet:
    """The protos as protoc parses them, with their comments (``--include_source_info``)."""
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.binpb"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc could not build the descriptor set")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


# Field numbers of the descriptor messages, as they appear in SourceCodeInfo.Location.path.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE, _SERVICE_METHOD = 2, 2

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    number: name.removeprefix("TYPE_").lower()
    for name, number in _FDP.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}


class _Comments:
    """Leading and trailing comments of one file, by descriptor path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path: dict[tuple[int, ...], str] = {}
        for loc in file.source_code_info.location:
            parts = [loc.leading_comments, loc.trailing_comments]
            text = "\n\n".join(_dedent(p) for p in parts if p.strip())
            if text:
                self._by_path[tuple(loc.path)] = text

    def __call__(self, *path: int) -> str:
        return self._by_path.get(path, "")


def _dedent(comment: str) -> str:
    """A comment's text: one leading space per line removed, paragraphs kept."""
    lines = [line.removeprefix(" ").rstrip() for line in comment.strip("\n").split("\n")]
    return "\n".join(lines).strip()


def _cell(text: str) -> str:
    """Comment text fit for one Markdown table cell."""
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return "<br><br>".join(paragraphs).replace("|", "\\|")


def _anchor(full_name: str) -> str:
    return full_name.lstrip(".").replace(".", "-").lower()


def _link(type_name: str, local: set[str]) -> str:
    name = type_name.lstrip(".")
    if type_name in local:
        return f"[`{name.rsplit('.', 1)[-1]}`](#{_anchor(type_name)})"
    return f"`{name}`"


class _ApiDocs:
    """Renders the files of one descriptor set as Markdown, in source order."""

    def __init__(self, files: list[descriptor_pb2.FileDescriptorProto]) -> None:
        self.files = files
        self.local: set[str] = set()  # full names (".pkg.Msg") of our messages and enums
        self.maps: dict[str, tuple[_FDP, _FDP]] = {}  # map-entry message -> (key, value)
        for f in files:
            self._index(f".{f.package}", list(f.message_type))
            self.local.update(f".{f.package}.{e.name}" for e in f.enum_type)
        self.out: list[str] = []

    def _index(self, prefix: str, messages: list[descriptor_pb2.DescriptorProto]) -> None:
        for m in messages:
            full = f"{prefix}.{m.name}"
            self.local.add(full)
            if m.options.map_entry:
                self.maps[full] = (m.field[0], m.field[1])
            self._index(full, list(m.nested_type))
            self.local.update(f"{full}.{e.name}" for e in m.enum_type)

    def _type(self, field: _FDP) -> str:
        if field.type_name in self.maps:
            key, value = self.maps[field.type_name]
            if not value.type_name:
                return f"`map<{_SCALARS[key.type]}, {_SCALARS[value.type]}>`"
            return f"map&lt;`{_SCALARS[key.type]}`, {self._type(value)}&gt;"
        if field.type_name:
            return _link(field.type_name, self.local)
        return f"`{_SCALARS[field.type]}`"

    def _heading(self, package: str, full: str, text: str) -> None:
        self.out += [f'### <a id="{_anchor(full)}"></a>{full.removeprefix(package + ".")}', ""]
        if text:
            self.out += [text, ""]

    def render(self) -> str:
        self.out = [
            "# API reference",
            "",
            "<!-- Generated by `python protos/generate.py --docs docs/api.md` from",
            "     protos/plaudit/**/*.proto; edit the comments there, not this file. -->",
            "",
            "Every service also offers `grpc.health.v1.Health` and server reflection. The HTTP",
            "JSON routes beside gRPC (OpenAI-, OpenRLHF-, vLLM- and TEI-compatible ones included)",
            "are listed in [http.md](http.md).",
            "",
        ]
        for f in self.files:
            comments = _Comments(f)
            self.out += [f"## {f.name}", "", f"Package `{f.package}`.", ""]
            for si, service in enumerate(f.service):
                self._service(f.package, service, comments, (_FILE_SERVICE, si))
            for mi, m in enumerate(f.message_type):
                self._message(f.package, f.package, m, comments, (_FILE_MESSAGE, mi))
            for ei, e in enumerate(f.enum_type):
                self._enum(f.package, f.package, e, comments, (_FILE_ENUM, ei))
        return "\n".join(self.out).rstrip("\n") + "\n"

    def _service(
        self,
        package: str,
        service: descriptor_pb2.ServiceDescriptorProto,
        comments: _Comments,
        path: tuple[int, ...],
    ) -> None:
        self._heading(package, f"{package}.{service.name}", comments(*path))
        self.out += ["| RPC | Request | Response | Description |", "| --- | --- | --- | --- |"]
        for mi, method in enumerate(service.method):
            req = _link(method.input_type, self.local)
            res = _link(method.output_type, self.local)
            req = f"stream {req}" if method.client_streaming else req
            res = f"stream {res}" if method.server_streaming else res
            text = _cell(comments(*path, _SERVICE_METHOD, mi))
            self.out.append(f"| `{method.name}` | {req} | {res} | {text} |")
        self.out.append("")

    def _message(
        self,
        package: str,
        prefix: str,
        m: descriptor_pb2.DescriptorProto,
        comments: _Comments,
        path: tuple[int, ...],
    ) -> None:
        full = f"{prefix}.{m.name}"
        if m.options.map_entry:
            return
        self._heading(package, full, comments(*path))
        if m.field:
            self.out += ["| Field | Type | Description |", "| --- | --- | --- |"]
        for fi, field in enumerate(m.field):
            kind = self._type(field)
            if field.label == _FDP.LABEL_REPEATED and field.type_name not in self.maps:
                kind = f"repeated {kind}"
            elif field.proto3_optional:
                kind = f"optional {kind}"
            elif field.HasField("oneof_index"):
                kind += f" (oneof `{m.oneof_decl[field.oneof_index].name}`)"
            text = _cell(comments(*path, _MESSAGE_FIELD, fi))
            self.out.append(f"| `{field.name}` = {field.number} | {kind} | {text} |")
        if m.field:
            self.out.append("")
        for ei, enum in enumerate(m.enum_type):
            self._enum(package, full, enum, comments, (*path, _MESSAGE_ENUM, ei))
        for ni, nested in enumerate(m.nested_type):
            self._message(package, full, nested, comments, (*path, _MESSAGE_NESTED, ni))

    def _enum(
        self,
        package: str,
        prefix: str,
        e: descriptor_pb2.EnumDescriptorProto,
        comments: _Comments,
        path: tuple[int, ...],
    ) -> None:
        self._heading(package, f"{prefix}.{e.name}", comments(*path))
        self.out += ["| Value | Number | Description |", "| --- | --- | --- |"]
        for vi, value in enumerate(e.value):
            text = _cell(comments(*path, _ENUM_VALUE, vi))
            self.out.append(f"| `{value.name}` | {value.number} | {text} |")
        self.out.append("")


def render_docs(files: descriptor_pb2.FileDescriptorSet) -> str:
    """The Markdown API reference of every file under plaudit/."""
    return _ApiDocs([f for f in files.file if f.name.startswith("plaudit/")]).render()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root")
    parser.add_argument("--docs", type=Path, help="write the Markdown API reference here instead")
    args = parser.parse_args()
    if args.docs:
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        args.docs.write_text(render_docs(describe()))
        return 0
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
