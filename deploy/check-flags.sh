#!/usr/bin/env bash
# Checks that every --flag the deployment files pass to `switchyard <verb>` exists.
#
#   deploy/check-flags.sh [SWITCHYARD_BINARY]      (default: target/debug/switchyard)
#
# Scans deploy/k8s/**/*.yaml, deploy/compose.yaml and deploy/compose.tls.yaml for switchyard command lines, in
# every form these files use:
#   command: ["switchyard", "sidecar"] + args: [--admin=..., ...]   (Kubernetes)
#   command: [registry, --node-id=1, ...]        (compose; the image's ENTRYPOINT is switchyard)
#   exec switchyard registry \ --listen ... \     (shell wrappers in block scalars)
#   # switchyard route split web ... --registry ...   (commands shown in comments)
# and checks each long flag against `switchyard <verb> [<subcommand>] --help`. Also checks
# that every SWITCHYARD_* environment variable named in those files is one the CLI reads.
# Exits 1 naming the file, line, command and flag of each unknown flag; 2 on usage errors.
# CHECK_FLAGS_VERBOSE=1 lists every flag found.
#
# What counts as one command: it starts at `switchyard VERB` (or at the first item of a
# command:/entrypoint:/args: list when that item is a verb) and runs until the next YAML
# key other than `args:`; in comments, until the end of the line (or of a `\`
# continuation). Short flags (-n) are not checked.
set -euo pipefail

bin=${1:-target/debug/switchyard}
# Resolve the binary before changing directory, so a relative path keeps working.
if [[ $bin == */* ]]; then
  [[ -x $bin ]] || { echo "check-flags: $bin is not an executable file" >&2; exit 2; }
  bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
else
  bin=$(command -v "$bin") || { echo "check-flags: $1 not found in PATH" >&2; exit 2; }
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."

files=()
while IFS= read -r f; do files+=("$f"); done < <(find deploy/k8s -name '*.yaml' | sort)
for f in deploy/compose.yaml deploy/compose.tls.yaml; do
  [[ -f $f ]] && files+=("$f")
done
((${#files[@]})) || { echo "check-flags: no files to check" >&2; exit 2; }

# The verbs and subcommands, from the binary itself ("Commands:" sections of --help).
commands_of() {
  "$bin" "$@" --help 2>/dev/null \
    | awk '/^Commands:/ {on = 1; next} on && /^[^ ]/ {on = 0} on && NF {print $1}' \
    | grep -vx help || true
}
top_help=$("$bin" --help) || { echo "check-flags: '$bin --help' failed" >&2; exit 2; }
verbs=$(commands_of)
[[ -n $verbs ]] || { echo "check-flags: no commands in '$bin --help'" >&2; exit 2; }
# Subcommand paths, two and three levels deep, as VERB/SUB and VERB/SUB/SUBSUB
# (`acl token create`).
subs=""
all_help=$top_help
for v in $verbs; do
  for s in $(commands_of "$v"); do
    subs+="$v/$s "
    for ss in $(commands_of "$v" "$s"); do subs+="$v/$s/$ss "; done
  done
  all_help+=$'\n'$("$bin" "$v" --help 2>/dev/null || true)
done
for path in $subs; do
  # shellcheck disable=SC2086  # the path's levels become separate words on purpose
  all_help+=$'\n'$("$bin" ${path//\// } --help 2>/dev/null || true)
done

# Extract "FILE<TAB>LINE<TAB>VERB<TAB>--FLAG" for every flag of a switchyard command.
extract() {
  awk -v verbs="$verbs" -v subs="$subs" '
    BEGIN {
      n = split(verbs, vs, /[ \n]+/); for (i = 1; i <= n; i++) if (vs[i] != "") isverb[vs[i]] = 1
      n = split(subs, ss, /[ \n]+/); for (i = 1; i <= n; i++) if (ss[i] != "") issub[ss[i]] = 1
    }
    FNR == 1 { verb = ""; expecting = 0; cverb = ""; ccont = 0 }
    # Scan one line of tokens with state (v = current verb, e = expecting a verb).
    function scan(text, is_comment,    toks, nt, i, t, f, k) {
      gsub(/[][,"`'"'"'\\]/, " ", text)
      nt = split(text, toks, /[ \t]+/)
      for (i = 1; i <= nt; i++) {
        t = toks[i]
        if (t == "") continue
        if (t == "switchyard" || t ~ /\/switchyard$/) { sw = 1; continue }
        if (sw || e) {
          sw = 0; e = 0
          if (t in isverb) { v = t; sub_ok = 1; continue }
        }
        if (v != "" && sub_ok) {
          k = v; gsub(/ /, "/", k)
          if ((k "/" t) in issub) { v = v " " t; continue }
          if (t !~ /^-/) sub_ok = 0
        }
        if (v != "" && t ~ /^--[A-Za-z0-9]/) {
          f = t; sub(/=.*/, "", f)
          printf "%s\t%d\t%s\t%s\n", FILENAME, FNR, v, f
        }
      }
    }
    {
      line = $0
      if (line ~ /^[ \t]*#/) {
        # A comment: its own command state, one line long unless continued with "\".
        sub(/^[ \t]*#+/, "", line)
        if (!ccont) { cverb = ""; csw = 0; csub = 0 }
        v = cverb; sw = csw; sub_ok = csub; e = 0
        scan(line, 1)
        cverb = v; csw = sw; csub = sub_ok
        ccont = (line ~ /\\[ \t]*$/)
        next
      }
      ccont = 0
      sub(/[ \t]#.*$/, "", line)            # trailing comment
      if (match(line, /^[ \t]*(-[ \t]+)?["'"'"']?[A-Za-z0-9_.\/-]+["'"'"']?:([ \t]|$)/)) {
        key = substr(line, 1, RLENGTH)
        rest = substr(line, RLENGTH + 1)
        gsub(/^[ \t]*(-[ \t]+)?["'"'"']?|["'"'"']?:[ \t]*$/, "", key)
        if (key == "args" && verb != "") {
          expecting = 0
        } else if (key == "command" || key == "entrypoint" || key == "args") {
          verb = ""; expecting = 1
        } else {
          verb = ""; expecting = 0
        }
        line = rest
        swp = 0; subp = 0
      }
      sub(/^[ \t]*-[ \t]+/, "", line)       # the dash of a list item
      v = verb; e = expecting; sw = swp; sub_ok = subp
      scan(line, 0)
      verb = v; expecting = e; swp = sw; subp = sub_ok
    }
  ' "${files[@]}"
}

declare -A help_of
status=0
checked=0
while IFS=$'\t' read -r file line verb flag; do
  if [[ -z ${help_of[$verb]+set} ]]; then
    # shellcheck disable=SC2086  # the verb may be "route split": two words on purpose
    help_of[$verb]=$("$bin" $verb --help 2>&1) || {
      echo "check-flags: $file:$line: 'switchyard $verb --help' failed: unknown command?" >&2
      status=1
      help_of[$verb]=""
      continue
    }
  fi
  checked=$((checked + 1))
  [[ -n ${CHECK_FLAGS_VERBOSE:-} ]] && echo "$file:$line: switchyard $verb $flag"
  if ! grep -qE -- "(^|[[:space:],])${flag}([[:space:]=]|$)" <<<"${help_of[$verb]}"; then
    echo "check-flags: $file:$line: 'switchyard $verb' has no flag $flag" >&2
    status=1
  fi
done < <(extract)

# Environment variables: every SWITCHYARD_* named must be one some command reads.
while IFS=: read -r file line name; do
  # "[env: NAME=]", or "[env: NAME]" for a variable whose value --help hides (secrets).
  if ! grep -qE -- "\\[env: $name(=|\\])" <<<"$all_help"; then
    echo "check-flags: $file:$line: no switchyard command reads environment variable $name" >&2
    status=1
  fi
done < <(grep -noE 'SWITCHYARD_[A-Z0-9_]+' "${files[@]}" /dev/null || true)

if ((checked == 0)); then
  echo "check-flags: found no switchyard flags in ${files[*]}: is the extractor broken?" >&2
  exit 1
fi
if ((status == 0)); then
  echo "check-flags: $checked flags in ${#files[@]} files match '$bin' --help"
fi
exit "$status"
