# chunkvol: make run (install, create the default pool and volume, serve it), make test.
# Everything the project needs is installed from here; nothing by hand.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
POOL ?= ./var/pool
VOLUME ?= disk0
SIZE ?= 4G
SOCKET ?= ./var/nbd.sock
PORT ?= 10809
# ceph-*, radosgw, python3-rados and python3-boto3: the RADOS and S3 mirror targets and their
# local lab (tools/objstore_lab.py). linux-source-6.12, flex, bison, bc: a user-mode kernel built
# once (tools/guest/uml_kernel.py; bookworm's linux.uml panics on hosts with AMX state).
# nbd-client, socat: the kernel's NBD client inside the qemu guest, reaching the host's socket.
# gcc, libxxhash-dev (header-only XXH3): the C extension chunkvol/format/fast.c.
# python3-prometheus-client: `serve --http`'s /metrics, inside nbdkit's /usr/bin/python3 too.
# chromium: the status page's test loads it in a real headless browser and takes a screenshot.
# systemd: systemd-analyze verify and systemd-escape for contrib/systemd/chunkvol@.service.
DEBIAN_PACKAGES := nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd python3-venv python3-dev \
	fuse3 qemu-utils qemu-system-x86 fio e2fsprogs xfsprogs linux-image-amd64 \
	psmisc util-linux busybox-static python3-cryptography iproute2 iptables \
	ceph-mon ceph-osd ceph-common python3-rados radosgw python3-boto3 \
	linux-source-6.12 flex bison bc xz-utils nbd-client socat gcc libxxhash-dev \
	python3-prometheus-client chromium systemd
export PATH := /usr/bin:/bin:/usr/sbin:/sbin:$(PATH)

.PHONY: all install install-service system-packages uml-kernel run test test-soak bench bench-history bench-mirror bench-objstore bench-multimaster clean

all: install

system-packages: .stamp-system-packages
.stamp-system-packages: Makefile
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

$(VENV)/.installed: .stamp-system-packages requirements.txt pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

# The hot path's pure functions in C (record.py and group_map.py keep the Python reference),
# built for /usr/bin/python3: the interpreter nbdkit embeds, and the venv's.
FAST_EXT := chunkvol/format/fast$(shell /usr/bin/python3 -c "import sysconfig;print(sysconfig.get_config_var('EXT_SUFFIX'))")
$(FAST_EXT): chunkvol/format/fast.c Makefile | .stamp-system-packages
	gcc -O2 -fPIC -shared -Wall $$(/usr/bin/python3-config --includes) -o $@ chunkvol/format/fast.c

install: $(VENV)/.installed $(FAST_EXT)

run: install
	@mkdir -p $(dir $(SOCKET))
	@test -f $(POOL)/pool.json || $(VENV)/bin/chunkvol --pool $(POOL) init
	@$(VENV)/bin/chunkvol --pool $(POOL) volume list --json | grep -q '"name": "$(VOLUME)"' || \
	  $(VENV)/bin/chunkvol --pool $(POOL) volume create $(VOLUME) --size $(SIZE)
	exec $(VENV)/bin/chunkvol --pool $(POOL) serve --socket $(SOCKET) --port $(PORT) --print-attach

# contrib/systemd/chunkvol@.service into systemd, with ExecStart pointing at this checkout's
# chunkvol (the file says /usr/local/bin/chunkvol). Then, for a pool at /srv/pool0:
#   systemctl enable --now "chunkvol@$$(systemd-escape --path /srv/pool0).service"
SYSTEMD_UNIT_DIR ?= /etc/systemd/system
install-service: install
	sed 's|^ExecStart=/usr/local/bin/chunkvol |ExecStart=$(CURDIR)/$(VENV)/bin/chunkvol |' contrib/systemd/chunkvol@.service \
	  > $(SYSTEMD_UNIT_DIR)/chunkvol@.service
	if [ -d /run/systemd/system ] && [ "$(SYSTEMD_UNIT_DIR)" = /etc/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed $(SYSTEMD_UNIT_DIR)/chunkvol@.service"

# The user-mode Linux the UML tests boot, built once (a few minutes, cached in /var/cache/chunkvol/uml or
# $CHUNKVOL_UML_CACHE) from Debian's linux-source-6.12 with tools/guest/uml/*.patch and a minimal config.
uml-kernel: install
	$(PY) -m tools.guest.uml_kernel

# Two workers (pytest-xdist): most tests wait on servers, sockets and disks, not the CPU. The
# object-store lab's tests and the real clients' guests are each one group on one worker
# (tests/conftest.py). TEST_WORKERS=0 runs everything in this one process, in order.
TEST_WORKERS ?= 2
test: install uml-kernel
	$(PY) -m pytest -q -x --timeout=600 -m "not soak" -n $(TEST_WORKERS) --dist loadgroup tests

# Longer runs: the multi-master simulation over many seeds, and more partition runs of two served nodes.
test-soak: install
	CHUNKVOL_SIM_SEEDS=$${SEEDS:-400} CHUNKVOL_PARTITION_SEEDS=1,2,3,4,5,6 $(PY) -m pytest -q -x --timeout=3600 \
	  tests/mirror/test_multimaster.py tests/mirror/test_multimaster_nodes.py

bench: install
	$(PY) tools/bench/run.py

bench-history: install
	$(PY) tools/bench/history_bench.py $(HISTORY_ARGS)

bench-mirror: install
	$(PY) tools/bench/mirror_bench.py $(MIRROR_ARGS)

bench-objstore: install
	$(PY) tools/bench/objstore_bench.py $(OBJSTORE_ARGS)

bench-multimaster: install
	$(PY) tools/bench/multimaster_bench.py $(MULTIMASTER_ARGS)

clean:
	rm -rf $(VENV) .stamp-system-packages var build *.egg-info $(FAST_EXT)
