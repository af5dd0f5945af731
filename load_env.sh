#!/usr/bin/env bash
# Load a .env file into the environment safely: the file is parsed, never executed.
#
#   source load_env.sh [FILE]              # export into the current bash shell (default: .env)
#   ./load_env.sh [FILE] -- COMMAND ...    # run COMMAND with the file's variables
#
# Format (the subset docker compose and python-dotenv agree on):
#   KEY=value                  unquoted: surrounding spaces trimmed; " #" starts a comment
#   KEY='literal value'        single quotes: taken as is, nothing expanded
#   KEY="a \"quoted\" value"   double quotes: \" \\ \$ \` \n \t escapes; nothing expanded
#   export KEY=value           the "export " prefix is allowed
#   # comment, blank lines     ignored
# $VAR, $(...) and `...` are never expanded or run: a value is exactly the text in the file.
# Values in the file override variables already set. Keys must be shell names.
#
# Refuses (exit/return 1, nothing exported) a file that its group or others can read when it
# holds a secret
# (a non-empty *_KEY, *_KEY_ID, *SECRET_KEY, *TOKEN*, *PASSWORD* variable): chmod 600 it first.
# Errors name the file, the line and the key, never a value (nor a line that is not KEY=value).

_load_env_main() {
    local file="${1:-.env}"
    if [[ ! -f "$file" ]]; then
        echo "load_env: $file: no such file" >&2
        return 1
    fi
    if [[ ! -r "$file" ]]; then
        echo "load_env: $file: not readable" >&2
        return 1
    fi

    # bash drops NUL bytes without a word: a value would not be the text in the file
    if command -v cmp >/dev/null && ! tr -d '\000' <"$file" | cmp -s - "$file"; then
        echo "load_env: $file: contains NUL bytes (not a text file?)" >&2
        return 1
    fi
    local -a keys=() values=()
    local line key rest value n=0 i c q len has_secret=0
    while IFS= read -r line || [[ -n "$line" ]]; do
        n=$((n + 1))
        line="${line%$'\r'}"
        if [[ "$line" == *$'\r'* ]]; then
            # old Mac line endings: the whole file is one line, a secret inside a value
            echo "load_env: $file line $n: a carriage return inside the line (CR line" \
                "endings? use LF)" >&2
            return 1
        fi
        # strip leading whitespace
        line="${line#"${line%%[![:space:]]*}"}"
        [[ -z "$line" || "$line" == \#* ]] && continue
        if [[ "$line" == export[[:space:]]* ]]; then
            line="${line#export}"
            line="${line#"${line%%[![:space:]]*}"}"
        fi
        if [[ "$line" != *=* ]]; then
            echo "load_env: $file line $n: expected KEY=value" >&2
            return 1
        fi
        key="${line%%=*}"
        key="${key%"${key##*[![:space:]]}"}"
        rest="${line#*=}"
        rest="${rest#"${rest%%[![:space:]]*}"}"
        if [[ ! "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
            # nothing of the line is shown: "KEY: value=" (YAML) or a wrapped base64 line
            # puts a value before the first "="
            echo "load_env: $file line $n: the text before '=' is not a valid variable name" \
                "(the line is not shown: it may hold a value)" >&2
            return 1
        fi
        value=""
        q="${rest:0:1}"
        if [[ "$q" == "'" ]]; then
            rest="${rest:1}"
            if [[ "$rest" != *"'"* ]]; then
                echo "load_env: $file line $n ($key): unterminated single quote" >&2
                return 1
            fi
            value="${rest%%"'"*}"
            rest="${rest#*"'"}"
        elif [[ "$q" == '"' ]]; then
            len=${#rest}
            i=1
            local closed=0
            while ((i < len)); do
                c="${rest:i:1}"
                if [[ "$c" == "\\" && $((i + 1)) -lt $len ]]; then
                    i=$((i + 1))
                    c="${rest:i:1}"
                    case "$c" in
                        n) value+=$'\n' ;;
                        t) value+=$'\t' ;;
                        '"' | "\\" | '$' | '`') value+="$c" ;;
                        *) value+="\\$c" ;;
                    esac
                elif [[ "$c" == '"' ]]; then
                    closed=1
                    break
                else
                    value+="$c"
                fi
                i=$((i + 1))
            done
            if ((closed == 0)); then
                echo "load_env: $file line $n ($key): unterminated double quote" >&2
                return 1
            fi
            rest="${rest:i+1}"
        else
            # unquoted: a comment starts at whitespace followed by #
            value="$rest"
            if [[ "$value" =~ ^(.*[^[:space:]])?[[:space:]]+#.*$ ]]; then
                value="${BASH_REMATCH[1]}"
            fi
            value="${value%"${value##*[![:space:]]}"}"
            rest=""
        fi
        # after a closing quote only whitespace or a comment may follow
        rest="${rest#"${rest%%[![:space:]]*}"}"
        if [[ -n "$rest" && "$rest" != \#* ]]; then
            echo "load_env: $file line $n ($key): unexpected text after the closing quote" >&2
            return 1
        fi
        keys+=("$key")
        values+=("$value")
        if [[ -n "$value" && "$key" != *_SECRET ]] &&
            [[ "$key" =~ (_KEY$|_KEY_ID$|SECRET_KEY|TOKEN|PASSWORD) ]]; then
            has_secret=1
        fi
    done <"$file"

    if ((has_secret)); then
        local mode
        # -L: a symlink's target's mode (a link's own is always 777)
        mode="$(stat -L -c %a "$file" 2>/dev/null || stat -L -f %Lp "$file" 2>/dev/null)"
        if [[ -z "$mode" ]]; then
            echo "load_env: $file: cannot read its permissions" >&2
            return 1
        fi
        if (((8#$mode & 8#044) != 0)); then
            echo "load_env: $file holds secrets but others on this machine can read it" \
                "(mode $mode); run: chmod 600 $file" >&2
            return 1
        fi
    fi

    for i in "${!keys[@]}"; do
        export "${keys[i]}=${values[i]}"
    done
    return 0
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # sourced: export into the caller's shell; never exit it
    if _load_env_main "${1:-.env}"; then
        unset -f _load_env_main
        return 0
    fi
    unset -f _load_env_main
    return 1
else
    set -uo pipefail
    file=".env"
    if [[ $# -gt 0 && "$1" != "--" ]]; then
        file="$1"
        shift
    fi
    if [[ $# -eq 0 || "$1" != "--" ]]; then
        echo "usage: source load_env.sh [FILE]   or   $0 [FILE] -- COMMAND [ARGS...]" >&2
        exit 2
    fi
    shift
    if [[ $# -eq 0 ]]; then
        echo "load_env: no command after --" >&2
        exit 2
    fi
    _load_env_main "$file" || exit 1
    exec "$@"
fi
