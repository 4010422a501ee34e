{
  description = "garret: a Nix binary cache (Attic-compatible) and Bazel remote cache on one chunked store";

  # Rust 1.95 (the workspace's rust-version) is in nixos-26.05.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        garret = final.callPackage ./deploy/nix/package.nix { src = self; };
      };

      packages = forSystems (pkgs:
        let garret = pkgs.callPackage ./deploy/nix/package.nix { src = self; };
        in {
          inherit garret;
          default = garret;
          # The OCI image without a container engine: `nix build .#image`,
          # then `skopeo copy docker-archive:result docker://REGISTRY/garret:0.1.0`.
          image = pkgs.dockerTools.buildLayeredImage {
            name = "garret";
            tag = garret.version;
            contents = [ pkgs.cacert ];
            extraCommands = "mkdir -p var/lib/garret";
            fakeRootCommands = "chown 65532:65532 var/lib/garret && chmod 0700 var/lib/garret";
            config = {
              Entrypoint = [ "${garret}/bin/garret" ];
              Cmd = [ "serve" ];
              User = "65532:65532";
              WorkingDir = "/var/lib/garret";
              Env = [
                "GARRET_LISTEN=0.0.0.0:8080"
                "GARRET_DATA_DIR=/var/lib/garret"
                "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
              ];
              ExposedPorts."8080/tcp" = { };
            };
          };
        });

      devShells = forSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.stdenv.hostPlatform.system}.garret ];
          # What ./tests/run drives for real, and the deploy/ checks.
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            nix
            postgresql_15
            bazel
            curl
            xz
            zstd
            kubectl
            (python3.withPackages (ps: [ ps.jsonschema ps.pyyaml ]))
          ];
        };
      });

      # `services.garret`: `garret serve` as a hardened systemd service and
      # `garret gc` on a timer. The overlay provides the default package.
      nixosModules.default = {
        imports = [ ./deploy/nix/module.nix ];
        nixpkgs.overlays = [ self.overlays.default ];
      };
    };
}
