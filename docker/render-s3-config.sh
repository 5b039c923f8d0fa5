#!/bin/sh
# SeaweedFS reads its S3 identities from a file; the credentials live in .env, not in the
# repository. This renders TEMPLATE into OUTPUT from $S3_ACCESS_KEY / $S3_SECRET_KEY, then
# runs the rest of the command line (the server) in its place.
#
#   render-s3-config.sh TEMPLATE OUTPUT [COMMAND ...]
set -eu
template=$1
out=$2
shift 2
for name in S3_ACCESS_KEY S3_SECRET_KEY; do
  eval "value=\${$name:-}"
  if [ -z "$value" ]; then
    echo "render-s3-config: $name is empty; set DISTILL_$name in .env (see .env.example)" >&2
    exit 1
  fi
  # written into JSON by sed: no quote, backslash, & or | (hex or base64 secrets are fine)
  case $value in
    *[!A-Za-z0-9._~+/=-]*)
      echo "render-s3-config: $name may hold only letters, digits and . _ ~ + / = -" >&2
      exit 1 ;;
  esac
done
umask 077
sed -e "s|@S3_ACCESS_KEY@|$S3_ACCESS_KEY|g" -e "s|@S3_SECRET_KEY@|$S3_SECRET_KEY|g" "$template" > "$out"
exec "$@"
