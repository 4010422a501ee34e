# `services.garret`: `garret serve` as a hardened systemd service, and
# `garret gc` as a oneshot service on a timer (the NixOS twin of the
# Kubernetes CronJob). Secrets (GARRET_DATABASE_URL with its password,
# GARRET_TOKEN_HS256_SECRET_BASE64, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)
# come from `environmentFile`, never from `settings`, which land in the
# world-readable Nix store.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.garret;
  settingsFormat = pkgs.formats.toml { };
  configFile = settingsFormat.generate "garret.toml" cfg.settings;

  # What serve and gc share: the configuration, the secrets, the user and a
  # sandbox that leaves them the network and their state directory only.
  common = {
    environment = {
      GARRET_CONFIG = "${configFile}";
      GARRET_DATA_DIR = "/var/lib/garret";
    };
    serviceConfig = {
      User = "garret";
      Group = "garret";
      StateDirectory = "garret";
      StateDirectoryMode = "0700";
      EnvironmentFile = lib.optional (cfg.environmentFile != null) cfg.environmentFile;
      UMask = "0077";
      NoNewPrivileges = true;
      CapabilityBoundingSet = "";
      AmbientCapabilities = "";
      ProtectSystem = "strict";
      ProtectHome = true;
      PrivateTmp = true;
      PrivateDevices = true;
      ProtectClock = true;
      ProtectHostname = true;
      ProtectKernelTunables = true;
      ProtectKernelModules = true;
      ProtectKernelLogs = true;
      ProtectControlGroups = true;
      ProtectProc = "invisible";
      ProcSubset = "pid";
      RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
      RestrictNamespaces = true;
      RestrictRealtime = true;
      RestrictSUIDSGID = true;
      LockPersonality = true;
      MemoryDenyWriteExecute = true;
      SystemCallArchitectures = "native";
      SystemCallFilter = [ "@system-service" "~@privileged" "~@resources" ];
    };
  };

  # SIGTERM lets requests in flight finish for this long (garret's default 60).
  shutdownSecs = (cfg.settings.connections or { }).shutdown_timeout_secs or 60;
in
{
  options.services.garret = {
    enable = lib.mkEnableOption "garret, the Nix binary cache and Bazel remote cache";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.garret;
      defaultText = lib.literalExpression "pkgs.garret";
      description = "The garret package (the flake's overlay provides pkgs.garret).";
    };

    settings = lib.mkOption {
      type = settingsFormat.type;
      default = { };
      example = lib.literalExpression ''
        {
          listen = "[::]:8080";
          api_endpoint = "https://cache.example.org/";
          storage = { type = "s3"; endpoint = "http://127.0.0.1:9000"; bucket = "garret"; };
          gc.default_retention = "30d";
        }
      '';
      description = "garret.toml (see the README's configuration table); no secrets here.";
    };

    environmentFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/run/secrets/garret.env";
      description = ''
        KEY=value lines for the secrets: GARRET_DATABASE_URL,
        GARRET_TOKEN_HS256_SECRET_BASE64, AWS_ACCESS_KEY_ID and
        AWS_SECRET_ACCESS_KEY. Without a token key garret makes one in
        /var/lib/garret on its first start.
      '';
    };

    gc = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "Run `garret gc` on `gc.schedule`.";
      };
      schedule = lib.mkOption {
        type = lib.types.str;
        default = "*-*-* 00/6:17:00";
        description = "When `garret gc` runs (systemd OnCalendar).";
      };
    };
  };

  config = lib.mkIf cfg.enable {
    users.users.garret = {
      isSystemUser = true;
      group = "garret";
    };
    users.groups.garret = { };

    systemd.services.garret = {
      description = "garret cache server";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" "postgresql.service" ];
      inherit (common) environment;
      serviceConfig = common.serviceConfig // {
        ExecStart = "${cfg.package}/bin/garret serve";
        Restart = "on-failure";
        TimeoutStopSec = shutdownSecs + 30;
        LimitNOFILE = 65536;
      };
    };

    systemd.services.garret-gc = lib.mkIf cfg.gc.enable {
      description = "garret garbage collection";
      after = [ "network-online.target" "postgresql.service" ];
      inherit (common) environment;
      serviceConfig = common.serviceConfig // {
        Type = "oneshot";
        ExecStart = "${cfg.package}/bin/garret gc --json";
      };
    };

    systemd.timers.garret-gc = lib.mkIf cfg.gc.enable {
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.gc.schedule;
        Persistent = true;
        RandomizedDelaySec = "10m";
      };
    };
  };
}
