#!/usr/bin/env python3
"""The docs against the binary (the unit test Docs.CommandLinesAndUsage):
1. Every `moeforge` command line in a code block of README.md and docs/ parses: run with MOEFORGE_ARGS_ONLY=1,
   the binary stops once the line's flags are parsed and checked (src/cli/args.cpp) and must exit 0. Stale flags
   fail here. Lines with placeholders in capitals (CHECKPOINT, DIR) are checked the same way: only flags matter.
2. `moeforge CMD --help` prints that command's usage and exits 0, for every command `moeforge --help` lists.
3. docs/cli.md holds `moeforge --help` verbatim (write it with --write).
usage: check_docs_cli.py MOEFORGE [--write]"""
import glob, os, re, shlex, subprocess, sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
mf = os.path.abspath(sys.argv[1])
CLI_MD = os.path.join(root, "docs", "cli.md")


def run(args, args_only=False):
    env = dict(os.environ)
    if args_only:
        env["MOEFORGE_ARGS_ONLY"] = "1"
    return subprocess.run([mf] + args, capture_output=True, text=True, env=env, cwd=root, timeout=60)


def command_lines(path):
    text = open(path, encoding="utf-8").read()
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").split("\n"):
            line = line.strip()
            m = re.match(r"^(?:\$ )?(?:[A-Z_]+=\S+ )*(?:\./)?(?:build/)?(?:moeforge|\$MF) (.*)$", line)
            if m:
                yield line, m.group(1)


usage = run(["--help"])
problems = []
if usage.returncode != 0:
    problems.append(f"moeforge --help: exit {usage.returncode}")
cli_md = "# moeforge command line\n\nWhat `moeforge --help` prints (`moeforge COMMAND --help` prints one command's part);\n" \
         "a test keeps this page equal to it. The guides in [docs/guides](guides) show each command in use;\n" \
         "every config and recipe key is in [keys.md](keys.md).\n\n```text\n" + usage.stdout + "```\n"
if "--write" in sys.argv:
    open(CLI_MD, "w", encoding="utf-8").write(cli_md)
elif not os.path.exists(CLI_MD) or open(CLI_MD, encoding="utf-8").read() != cli_md:
    problems.append("docs/cli.md: differs from `moeforge --help` (rewrite it: scripts/check_docs_cli.py build/moeforge --write)")

commands = sorted(set(re.findall(r"^  ([a-z]+)\b", usage.stdout, flags=re.M)))
for c in commands:
    r = run([c, "--help"])
    if r.returncode != 0 or not r.stdout.startswith("usage:") or f"  {c}" not in r.stdout:
        problems.append(f"moeforge {c} --help: exit {r.returncode}, printed {r.stdout[:60]!r} {r.stderr[:200]!r}")

checked = 0
docs = [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "**", "*.md"), recursive=True))
for path in docs:
    if os.path.samefile(path, CLI_MD) if os.path.exists(CLI_MD) else False:
        continue
    for line, rest in command_lines(path):
        rest = re.split(r"\s(?:\||&&|;|>|2>|<)\s|\s#\s", " " + rest + " ")[0].strip()
        try:
            args = shlex.split(rest)
        except ValueError as e:
            problems.append(f"{os.path.relpath(path, root)}: cannot split '{line}': {e}")
            continue
        args = [os.path.expandvars(a) for a in args]
        r = run(args, args_only=True)
        checked += 1
        if r.returncode != 0:
            problems.append(f"{os.path.relpath(path, root)}: '{line}': exit {r.returncode}: {r.stderr.strip()[:300]}")

for p in problems:
    print(p)
print(f"{checked} command lines in the docs checked, {len(commands)} commands' --help")
sys.exit(1 if problems else 0)
