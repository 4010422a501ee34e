# The garret binary from the workspace, with the versions Cargo.lock pins.
{ lib, rustPlatform, src }:

rustPlatform.buildRustPackage {
  pname = "garret";
  version = (lib.importTOML ../../Cargo.toml).workspace.package.version;
  inherit src;
  cargoLock.lockFile = ../../Cargo.lock;
  cargoBuildFlags = [ "-p" "garret-server" "--bin" "garret" ];
  # The end-to-end tests start Postgres, Nix and Bazel; ./tests/run runs them.
  doCheck = false;
  meta = {
    description = "A Nix binary cache (Attic-compatible) and Bazel remote cache on one chunked store";
    mainProgram = "garret";
    platforms = lib.platforms.linux;
  };
}
