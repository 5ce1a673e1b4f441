#!/bin/sh
# Add Cachet (this unpacked folder) to the desktop's application menu, for the current user only.
#   ./install-desktop-entry.sh            add the menu entry and icon
#   ./install-desktop-entry.sh --remove   remove them again (the folder itself is deleted by hand)
# Nothing is written outside ~/.local/share; chats stay in ~/.local/share/Cachet either way.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
apps="${XDG_DATA_HOME:-$HOME/.local/share}/applications"
icons="${XDG_DATA_HOME:-$HOME/.local/share}/icons/hicolor"
if [ "${1:-}" = "--remove" ]; then
    rm -f "$apps/cachet.desktop"
    for size in 16 32 48 64 128 256 512; do rm -f "$icons/${size}x${size}/apps/cachet.png"; done
    command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database "$apps" || true
    echo "Cachet's menu entry is removed. Delete $here to remove the program."
    exit 0
fi
mkdir -p "$apps"
for size in 16 32 48 64 128 256 512; do
    src="$here/icons/cachet-$size.png"
    [ -f "$src" ] || continue
    mkdir -p "$icons/${size}x${size}/apps"
    cp "$src" "$icons/${size}x${size}/apps/cachet.png"
done
sed "s|^Exec=cachet|Exec=\"$here/cachet\"|" "$here/cachet.desktop" > "$apps/cachet.desktop"
chmod 644 "$apps/cachet.desktop"
command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database "$apps" || true
echo "Cachet is in your application menu (it runs $here/cachet)."
