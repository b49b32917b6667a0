# Sourced by demo.sh and test.sh: make sure `python3` below is a Python we may install into.
# Inside a virtual environment or a conda environment, that one is used as it is. Otherwise the
# project's own environment .venv (created on first use, reused after) is activated, so the scripts
# work with Debian's externally managed /usr/bin/python3 (PEP 668) as well as pyenv or a system
# Python. Afterwards: `source .venv/bin/activate` and call `gradproj`, or run `.venv/bin/gradproj`.
inside_env=$(python3 -c 'import sys; print(int(sys.prefix != sys.base_prefix))' 2>/dev/null || echo 0)
if [[ $inside_env != 1 && -z ${CONDA_PREFIX:-} ]]; then
  if [[ ! -x .venv/bin/python3 ]]; then
    echo "gradproj: creating the project environment in $(pwd)/.venv" >&2
    if ! python3 -m venv .venv 2>/dev/null; then
      rm -rf .venv
      # Debian and Ubuntu ship venv's pip bootstrap separately (python3.X-venv)
      version=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        (apt-get update -qq && apt-get install -y -qq "python${version}-venv") >/dev/null
        python3 -m venv .venv
      else
        echo "gradproj: 'python3 -m venv' failed; install python${version}-venv (sudo apt-get install" \
          "python${version}-venv) or activate an environment of your own, then run this again" >&2
        exit 1
      fi
    fi
  fi
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
