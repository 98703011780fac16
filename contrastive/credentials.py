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
run time, and redacted in every copy written after resolution. Whatever message a value the run
brought in from the environment reaches (a retry's warning quoting the command that failed, a
library's error), the log filter `seal_logs` installs on every handler replaces it.

A `pipe:` command is read by one parser for both refusal and redaction (`command_words`, then the
option grammar of curl, wget and aws: attached and combined short options, `--opt=value`, cookies,
`--oauth2-bearer`, user:password, assignments), so an option named like a credential that takes no
value (`--no-sign-request`, `--anyauth`) keeps the word after it.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
from dataclasses import dataclass
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
    text = re.sub(r"\$\{[^}]*\}", "$REFERENCE", text)  # ${oc.env:VAR} holds a colon of its own
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


# How the tools a `pipe:` command runs (curl, wget, aws, gsutil, ...) take a credential: by option,
# the kind of value it takes. `userpass`: user[:password] (the password is the secret); `header`: a
# "Name: value" header (secret when the name is one: Authorization, Cookie, X-Api-Key...); `cookie`:
# name=value pairs (a bare word is a cookie file); `secret`: the whole value.
LONG_OPTIONS = {
    "--user": "userpass",
    "--proxy-user": "userpass",
    "--cert": "userpass",
    "--proxy-cert": "userpass",
    "--header": "header",
    "--proxy-header": "header",
    "--cookie": "cookie",
    "--oauth2-bearer": "secret",
    "--pass": "secret",
    "--proxy-pass": "secret",
}
SHORT_OPTIONS = {"u": "userpass", "U": "userpass", "E": "userpass", "H": "header", "b": "cookie"}
# curl's short options that take a value: in `-sH X`, H takes X; in `-sL`, nothing does
SHORT_WITH_VALUE = set("AbcCdDeEFHKmoPQrtTuUwxXyYz")
# options named like a credential that take no value: what follows them is the next word, kept
FLAGS = {"--anyauth", "--proxy-anyauth", "--auth-no-challenge", "--no-sign-request", "--basic", "--digest"}


@dataclass(frozen=True)
class Word:
    """A word of a command line as a POSIX shell splits it: its value, and where it stands."""

    value: str
    start: int
    end: int


def command_words(command: str) -> list[Word]:
    """The words of `command` (quotes removed, backslashes applied), each with its span in the text."""
    words, i, n = [], 0, len(command)
    while i < n:
        while i < n and command[i].isspace():
            i += 1
        if i >= n:
            break
        start, value = i, []
        while i < n and not command[i].isspace():
            c = command[i]
            if c == "'":
                close = command.find("'", i + 1)
                close = n if close < 0 else close
                value.append(command[i + 1 : close])
                i = close + 1
            elif c == '"':
                i += 1
                while i < n and command[i] != '"':
                    escaped = command[i] == "\\" and i + 1 < n and command[i + 1] in '"\\$`'
                    value.append(command[i + 1] if escaped else command[i])
                    i += 2 if escaped else 1
                i += 1
            elif c == "\\" and i + 1 < n:
                value.append(command[i + 1])
                i += 2
            else:
                value.append(c)
                i += 1
        words.append(Word("".join(value), start, i))
    return words


def _value_secret(kind: str, value: str) -> tuple[str, str] | None:
    """(why, the value redacted) when a `kind` option's value holds a credential, else None."""
    if kind == "userpass":
        user, colon, password = value.partition(":")
        return ("a user:password", f"{user}:{REDACTED}") if colon and _words_literal(password) else None
    if kind == "header":
        name, colon, rest = value.partition(":")
        if colon and SECRET_NAME.search(name.strip()) and _words_literal(rest):
            return f"a {name.strip()} header", f"{name.strip()}: {REDACTED}"
        return None
    if kind == "cookie":
        pairs = [v for _, eq, v in (p.strip().partition("=") for p in value.split(";")) if eq]
        return ("a cookie", REDACTED) if any(_literal(v) for v in pairs) else None
    return ("a secret value", REDACTED) if _literal(value) and not value.startswith("-") else None


def _option_secret(v: str, pending: str | None) -> tuple[str | None, tuple[str, str, str] | None]:
    """(the kind of value the next word is, (why, the word's option part, its value redacted) when this
    word holds a credential) for one word `v` of a command, the previous word's option awaiting `pending`."""
    if pending is not None and pending != "skip":
        found = _value_secret(pending, v)
        return None, (found[0], "", found[1]) if found else None
    if pending == "skip" or not v.startswith("-"):  # a value of another option, or no option
        name, eq, value = v.partition("=")
        if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and SECRET_NAME.search(name) and _literal(value):
            return None, (f"an assignment to {name}", f"{name}=", REDACTED)
        return None, None
    if v.startswith("--"):
        name, eq, attached = v.partition("=")
        kind = LONG_OPTIONS.get(name)
        if kind is None and name not in FLAGS and SECRET_NAME.search(name[2:]):
            kind = "secret"
        if kind and eq:
            found = _value_secret(kind, attached)
            return None, (f"{found[0]} given to {name}", f"{name}=", found[1]) if found else None
        return kind, None
    for j, letter in enumerate(v[1:], start=1):  # combined short options: -sSfu user:pass, -H"..."
        if letter in SHORT_WITH_VALUE:
            kind, rest = SHORT_OPTIONS.get(letter, "skip"), v[j + 1 :]
            if not rest:
                return kind, None
            found = _value_secret(kind, rest) if kind != "skip" else None
            return None, (f"{found[0]} given to -{letter}", v[: j + 1], found[1]) if found else None
    return None, None


def _word_secrets(words: list[Word]) -> Iterator[tuple[int, str, str]]:
    """(index of the word, why, the word as it may be shown) for each word of a command holding a
    credential: an option's value (attached, combined or separate), an assignment, a URL's."""
    pending: str | None = None  # the kind of value the previous word's option awaits
    for i, word in enumerate(words):
        pending, found = _option_secret(word.value, pending)
        if found:
            yield i, found[0], found[1] + _shown(found[2])
            continue
        redacted = _URL.sub(lambda m: _redact_url(m.group(0)), word.value)
        if redacted != word.value:
            yield i, next(filter(None, (url_secret(u) for u in _URL.findall(word.value))), "a URL"), _shown(redacted)


def command_secret(command: str) -> str | None:
    """Why this `pipe:` command carries a credential, or None."""
    found = next(_word_secrets(command_words(command)), None)
    return found[1] if found else None


def _shown(value: str) -> str:
    """A word as written back into a command: quoted where it holds spaces or quotes."""
    return shlex.quote(value) if re.search(r"[\s'\"\\]", value) else value


def location_secret(text: str) -> str | None:
    """Why a location or any other string value carries a credential, or None. A value the run brought
    in from the environment (`seal_logs`) is a reference there, as `${oc.env:...}` was before resolution."""
    for value in SEALED:
        text = text.replace(value, "$SEALED")
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
    """The credentials `command_secret` finds (the same parser), replaced word by word; every other
    word, $references and flags without a value included, stays as written."""
    words = command_words(command)
    for i, _, shown in sorted(_word_secrets(words), reverse=True):
        command = command[: words[i].start] + shown + command[words[i].end :]
    return command


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


ENV_VALUE = re.compile(r"\$\{oc\.env:([^,}]+)")
SHELL_VALUE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")
MIN_SEALED = 8  # shorter values are not sealed: replacing them would mangle ordinary log text
SEALED: set[str] = set()  # the values this process brought in from the environment (seal_logs)


def environment_secrets(plain: Any, environ: Mapping[str, str] = os.environ) -> set[str]:
    """The values a config (unresolved) brings in from the environment: every `${oc.env:VAR}`, and the
    `$VAR`s named like a credential in its pipe: commands (the shell fills them in)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            names = ENV_VALUE.findall(node)
            if node.startswith(PIPE):
                names += [n for n in SHELL_VALUE.findall(node) if SECRET_NAME.search(n)]
            found.update(environ[n.strip()] for n in names if len(environ.get(n.strip(), "")) >= MIN_SEALED)

    walk(plain)
    return found


class SealSecrets(logging.Filter):
    """Replaces each of `values` in every record's message (a handler's filter: whatever logger it
    came from, whatever text it is in)."""

    def __init__(self, values: set[str]):
        super().__init__()
        self.values = sorted(values, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(v in message for v in self.values):
            for v in self.values:
                message = message.replace(v, REDACTED)
            record.msg, record.args = message, None
            record.exc_text = None
        if record.exc_info and not record.exc_text:  # a traceback quoting the value is text too
            text = logging.Formatter().formatException(record.exc_info)
            if any(v in text for v in self.values):
                for v in self.values:
                    text = text.replace(v, REDACTED)
                record.exc_info, record.exc_text = None, text
        return True


def seal_logs(values: set[str]) -> None:
    """Installs SealSecrets on every handler there is (the root's, Hydra's file and console, each
    logger's), so that no log line shows one of `values`; worker processes forked later inherit it."""
    if not values:
        return
    SEALED.update(values)
    sealing = SealSecrets(values)
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for handler in {h for lg in loggers for h in lg.handlers}:
        if not any(isinstance(f, SealSecrets) for f in handler.filters):
            handler.addFilter(sealing)
