#!/bin/bash
# Pack dist/Cachet.app (from `python packaging/build.py` on macOS) into a drag-to-install disk image.
#   packaging/macos/make_dmg.sh dist/Cachet.app dist/Cachet-<version>-macos-<arch>.dmg
# The image holds Cachet.app and a link to /Applications. Uses only macOS's own hdiutil.
# The app is not signed: on first open, macOS asks to confirm (right-click → Open), see README.
# To sign and notarize, run `codesign --deep --options runtime -s "Developer ID Application: …"
# Cachet.app` before this script and `xcrun notarytool submit … --wait` + `xcrun stapler staple` after.
set -euo pipefail
app=${1:?usage: make_dmg.sh path/to/Cachet.app out.dmg}
out=${2:?usage: make_dmg.sh path/to/Cachet.app out.dmg}
[ -d "$app" ] || { echo "make_dmg: $app does not exist" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -R "$app" "$stage/Cachet.app"
ln -s /Applications "$stage/Applications"
rm -f "$out"
hdiutil create -volname "Cachet" -srcfolder "$stage" -fs HFS+ -format UDZO -imagekey zlib-level=9 -ov "$out"
echo "make_dmg: wrote $out"
