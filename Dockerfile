# The lazyblob image: the daemon, its libraries, busybox for the DaemonSet's shell steps and
# the node installer, on an empty base (deploy/image/rootfs.sh lays it out; on a machine
# without Docker, deploy/image/build-image.sh builds the same image with umoci and skopeo).
#   docker build -t registry.example.com/lazyblob:0.1.0 .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin lazyblob \
	&& strip --strip-debug target/release/lazyblob

FROM debian:bookworm-slim AS rootfs
RUN apt-get update \
	&& apt-get install -y --no-install-recommends busybox-static ca-certificates \
	&& rm -rf /var/lib/apt/lists/*
COPY deploy/image/rootfs.sh /src/deploy/image/rootfs.sh
COPY deploy/kubernetes/install-host-service.sh /src/deploy/kubernetes/install-host-service.sh
COPY --from=build /src/target/release/lazyblob /src/lazyblob
RUN sh /src/deploy/image/rootfs.sh /src/lazyblob /rootfs

FROM scratch
COPY --from=rootfs /rootfs /
ENV PATH=/usr/local/bin:/bin
ENTRYPOINT ["/usr/local/bin/lazyblob"]
CMD ["daemon", "--config", "/etc/lazyblob/lazyblob.toml"]
