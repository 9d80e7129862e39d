# Sourced on the GPU machine after prelude.sh: installs the carried .whl_hf/ (transformers,
# tokenizers, safetensors and their pure-Python dependencies) into /tmp/site_hf once and
# puts it on PYTHONPATH, for tests/fixtures/hf/make_fixtures.py and released models' shapes.
R="${R:-$OLDPWD}"
if [ ! -f /tmp/site_hf/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_hf "$R"/.whl_hf/*.whl \
    && touch /tmp/site_hf/.installed || return 1
fi
export PYTHONPATH=$PYTHONPATH:/tmp/site_hf
