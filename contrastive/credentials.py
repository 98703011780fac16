"""What is a credential, decided in one place, and the two things done with one: refusing it in a
config, and redacting it wherever a location, an option or a config is written or shown.

A run's config is saved with the run (config.yaml, Hydra's .hydra/, every checkpoint's metadata,
wandb's and TensorBoard's config, the export's config.json and model card), and checkpoints and
exports travel to buckets and are published. So a credential never belongs in it: storage
libraries read theirs from the environment, a profile or netrc (AWS_*, gcloud, ~/.netrc), and a
shell command reads `$VARIABLES`. What counts as a credential:

- a key named like one, at any depth (`...password`, `aws_secret_access_key`, `token`, `api_key`,
  `headers.Authorization`, `Cookie`, ...) holding a literal value;
- in a URL: user information (`https://user:pass@host`, `https://TOKEN@host`) and signed or keyed
  query parameters (`X-Amz-Signature`, `sig`, `token`, `key`, ...);
- in a `pipe:` command: `-u user:pass` / `--user`, a secret header given to `-H`/`--header`, an
  assignment like `AWS_SECRET_ACCESS_KEY=...`, and options like `--password X`, unless the value is
  a `$VARIABLE` the shell fills in.

A value that is an interpolation (`${oc.env:SHARD_TOKEN}`) is no literal: it is allowed, resolved at
run time, and redacted in every copy written after resolution.
"""

from __future__ import annotations

import re
import shlex
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qsl, urlsplit, urlunsplit

REDACTED = "<redacted>"
PIPE = "pipe:"
_WORDS = (
    r"secret|password|passwd|passphrase|token|credentials?|auth|authorization|cookie|"
    r"api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key|key[_-]?id|sas|signature|sig"
)
# a name (config key, header, query parameter, environment variable, option) that holds a credential
SECRET_NAME = re.compile(rf"(?:^|[_\-.])(?:{_WORDS})(?:$|[_\-.])", re.IGNORECASE)
SECRET_QUERY = re.compile(rf"(?:^|[_\-.])(?:{_WORDS}|key|x-amz-[a-z-]+|x-goog-[a-z-]+)(?:$|[_\-.])", re.IGNORECASE)
_REFERENCE = re.compile(r"^(?:\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|\$\{oc\.env:[^}]+\})$")  # $VAR, ${VAR}, ${oc.env:VAR}
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
_AUTH_SCHEMES = {"bearer", "basic", "token", "digest", "negotiate"}


def _literal(value: Any) -> bool:
    """A value that holds a credential itself (not a reference the environment fills in)."""
    if value is None or isinstance(value, bool):
        return False
    text = str(value).strip()
    if not text or text == "???" or _REFERENCE.match(text):
        return False
    if "${" in text:  # interpolations bring the value in at run time: what surrounds them must be no secret
        return _words_literal(re.sub(r"\$\{[^}]*\}", " ", text))
    return True


def _words_literal(text: str) -> bool:
    """A header or user:password value with a literal part: every word must be a scheme or a $reference."""
    words = [w for w in re.split(r"[\s:]+", text.strip()) if w]
    return any(w.lower() not in _AUTH_SCHEMES and not _REFERENCE.match(w) for w in words)


def url_secret(url: str) -> str | None:
    """Why this URL carries a credential, or None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if "@" in parts.netloc:
        return "user information in the URL (user:password@ or a token@)"
    secret = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if SECRET_QUERY.search(k)]
    return f"a signed or keyed query ({', '.join(secret)})" if secret else None


def command_secret(command: str) -> str | None:
    """Why this `pipe:` command carries a credential, or None."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        option, eq, attached = word.partition("=")
        if word in ("-u", "--user", "--proxy-user") or word.startswith("-u") and len(word) > 2:
            value = following if word in ("-u", "--user", "--proxy-user") else word[2:]
            if ":" in value and _words_literal(value.split(":", 1)[1]):
                return f"a user:password given to {word if len(word) <= 2 or word.startswith('--') else '-u'}"
        if (
            option in ("--user", "--proxy-user")
            and eq
            and ":" in attached
            and _words_literal(attached.split(":", 1)[1])
        ):
            return f"a user:password given to {option}"
        if word in ("-H", "--header") or option == "--header" and eq:
            header = following if not eq else attached
            name, colon, value = header.partition(":")
            if colon and SECRET_NAME.search(name.strip()) and _words_literal(value):
                return f"a {name.strip()} header"
        if word.startswith("--") and SECRET_NAME.search(option[2:]):
            value = attached if eq else following
            if _literal(value) and not value.startswith("-"):
                return f"a value given to {option}"
        name, eq, value = word.partition("=")
        if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and SECRET_NAME.search(name) and _literal(value):
            return f"an assignment to {name}"
        for url in _URL.findall(word):
            why = url_secret(url)
            if why:
                return why
    return None


def location_secret(text: str) -> str | None:
    """Why a location or any other string value carries a credential, or None."""
    if text.startswith(PIPE):
        return command_secret(text[len(PIPE) :])
    for url in _URL.findall(text):
        why = url_secret(url)
        if why:
            return why
    return None


def find_secrets(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(key path, why) of each credential in a plain config (dicts, lists, scalars; interpolations
    unresolved)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if SECRET_NAME.search(str(key)) and not isinstance(value, (Mapping, list, tuple)) and _literal(value):
                yield where, "a key named like a credential, holding a value"
            else:
                yield from find_secrets(value, where)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from find_secrets(value, f"{path}[{i}]")
    elif isinstance(node, str):
        why = location_secret(node)
        if why:
            yield path, why


def secret_message(found: list[tuple[str, str]], what: str = "the config") -> str:
    listed = "; ".join(f"{where}: {why}" for where, why in found)
    return (
        f"{what} holds a credential ({listed}). Configs are saved with every run, its checkpoints and its "
        "export, so credentials come from the environment, a profile or netrc: AWS_* or an AWS profile, "
        "gcloud's, ~/.netrc; a pipe: command reads $VARIABLES; a storage option can be "
        "${oc.env:VARIABLE}, which is resolved at run time and redacted wherever it is written"
    )


def redact_location(text: str) -> str:
    """A location (or any string) as it may be written or shown: no user information, no query
    string on a URL that carries one, no credential in a pipe: command."""
    if text.startswith(PIPE):
        return PIPE + _redact_command(text[len(PIPE) :])
    return _URL.sub(lambda m: _redact_url(m.group(0)), text)


def _redact_url(url: str) -> str:
    """No user information; the values of signed or keyed query parameters replaced."""
    try:
        parts = urlsplit(url)
        port = parts.port
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return REDACTED
    secret = any(SECRET_QUERY.search(k) for k, _ in query)
    if "@" not in parts.netloc and not secret:
        return url
    netloc = (parts.hostname or "") + (f":{port}" if port else "")
    if secret:
        kept = [(k, REDACTED if SECRET_QUERY.search(k) else v) for k, v in query]
        query_text = "&".join(f"{k}={v}" for k, v in kept)
    else:
        query_text = parts.query
    return urlunsplit((parts.scheme, netloc, parts.path, query_text, parts.fragment))


def _redact_command(command: str) -> str:
    """The credentials `command_secret` finds, replaced; $references the shell fills in are kept."""

    def value(match: re.Match, literal=_words_literal) -> str:
        return match.group(1) + (REDACTED if literal(match.group(2)) else match.group(2))

    command = _URL.sub(lambda m: _redact_url(m.group(0)), command)
    # -u/--user user:password
    command = re.sub(r"((?:^|\s)(?:-u\s*|--(?:proxy-)?user[=\s]+)['\"]?[^\s:'\"]+:)([^\s'\"]+)", value, command)
    # a secret header's value
    command = re.sub(
        rf"((?:-H|--header)[=\s]+['\"]?[^:'\"]*(?:{_WORDS})[^:'\"]*:\s*)([^'\"]*)", value, command, flags=re.IGNORECASE
    )
    # NAME_WITH_SECRET=value and --secret-option value
    command = re.sub(
        rf"(\b[A-Za-z0-9_]*(?:{_WORDS})[A-Za-z0-9_]*=)([^\s'\"]+)",
        lambda m: value(m, lambda v: _literal(v)),
        command,
        flags=re.IGNORECASE,
    )
    return re.sub(
        rf"(--[A-Za-z0-9-]*(?:{_WORDS})[A-Za-z0-9-]*[=\s]+)((?!-)[^\s'\"]+)",
        lambda m: value(m, lambda v: _literal(v)),
        command,
        flags=re.IGNORECASE,
    )


def redact(node: Any) -> Any:
    """A copy of a plain config with every credential replaced: values of keys named like one, and
    the credentials inside locations and commands. For everything that writes a config or shows one."""
    if isinstance(node, Mapping):
        return {
            key: REDACTED
            if SECRET_NAME.search(str(key)) and not isinstance(value, (Mapping, list, tuple)) and _literal(value)
            else redact(value)
            for key, value in node.items()
        }
    if isinstance(node, (list, tuple)):
        return [redact(value) for value in node]
    if isinstance(node, str):
        return redact_location(node)
    return node
