# Lacuna BIDS App image.
#
#   docker build -t lacuna .                                  (or: podman build -t lacuna .)
#   docker run --rm -v /data/bids:/bids:ro -v /data/out:/out lacuna /bids /out participant
#
# Build arguments
#   LACUNA_ATLAS_URL  base URL of an atlas mirror (<base>/<TemplateFlow-style file name>);
#                     empty (default) = the public sources. Recorded in the image history,
#                     so never put credentials in it.
#   LACUNA_ATLASES    catalogue parcellations baked into the image, space-separated;
#                     "all" (default) = the whole catalogue (~6 MB).
#   LACUNA_TEMPLATEFLOW_URL  base URL of a TemplateFlow mirror (<base>/tpl-<B>/<file>) for
#                     the MNI152NLin6Asym <-> MNI152NLin2009cAsym transforms; empty = TemplateFlow.
#   LACUNA_TRANSFORMS "all" (default) bakes both transforms (needed when masks and atlases
#                     or connectomes are in different spaces); "none" leaves them out.
#   VERSION           version label; keep equal to lacuna/_version.py (a test checks it).
#   IMAGE_TAG         image name recorded in derivatives (GeneratedBy.Container.Tag).
#
# At run time nothing is downloaded: parcellations and transforms are baked into the
# read-only data directory /opt/lacuna/data, which stays on LACUNA_DATA_PATH (searched
# after LACUNA_DATA_DIR) when LACUNA_DATA_DIR points at a mounted connectome cache
# (-v /host/cache:/cache -e LACUNA_DATA_DIR=/cache).
# The image works read-only (--read-only --tmpfs /tmp), as any --user, without a HOME.

FROM debian:bookworm-slim

ARG VERSION=0.1.0
ARG IMAGE_TAG=ghcr.io/lacuna-neuro/lacuna:${VERSION}
ARG LACUNA_ATLAS_URL=
ARG LACUNA_ATLASES=all
ARG LACUNA_TEMPLATEFLOW_URL=
ARG LACUNA_TRANSFORMS=all

LABEL org.opencontainers.image.title="Lacuna" \
      org.opencontainers.image.description="BIDS App for lesion network mapping: regional damage, functional and structural lesion network mapping" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/lacuna-neuro/lacuna" \
      org.opencontainers.image.url="https://github.com/lacuna-neuro/lacuna" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.vendor="The Lacuna developers" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

# Python 3.11 from Debian; no compilers (every dependency ships wheels).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/log/apt /var/log/dpkg.log \
 && python3 -m venv /opt/venv

# The project from the build context (.dockerignore keeps only what the install needs).
COPY pyproject.toml README.md /tmp/lacuna-src/
COPY lacuna /tmp/lacuna-src/lacuna
# Third-party test suites (~100 MB, never imported) are dropped.
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check /tmp/lacuna-src \
 && find /opt/venv/lib/python3*/site-packages -mindepth 2 -type d -name tests \
        -not -path '*/site-packages/lacuna/*' -prune -exec rm -rf {} + \
 && rm -rf /tmp/lacuna-src

ENV PATH=/opt/venv/bin:${PATH} \
    LACUNA_DATA_DIR=/opt/lacuna/data \
    LACUNA_DATA_PATH=/opt/lacuna/data \
    LACUNA_CONTAINER_TYPE=docker \
    LACUNA_CONTAINER_TAG=${IMAGE_TAG} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    HDF5_USE_FILE_LOCKING=FALSE

# Reference data, fetched now so that the image runs offline.
RUN if [ "$LACUNA_ATLASES" = all ]; then lacuna atlases fetch --all; \
    else lacuna atlases fetch $LACUNA_ATLASES; fi \
 && if [ "$LACUNA_TRANSFORMS" != none ]; then \
        lacuna transforms fetch; \
    fi \
 && find /opt/lacuna/data -name '*.lock' -delete \
 && chmod -R a+rX,go-w /opt/lacuna \
 && lacuna atlases list

# A non-root default user; any other --user works as well (nothing in the image is
# written at run time, and HOME is never used).
RUN useradd --uid 1000 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin lacuna
USER lacuna

ENTRYPOINT ["lacuna"]
CMD ["--help"]
