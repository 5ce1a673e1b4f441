; Inno Setup 6 script: Cachet's Windows installer (Start-menu entry, optional desktop icon, uninstaller).
;
; Built by `python packaging/build.py` on Windows when ISCC.exe (Inno Setup 6) is found, which passes:
;   /DAppVersion=<version from pyproject.toml>  /DSourceDir=<dist\Cachet>  /DOutputDir=<dist>
; By hand, after the PyInstaller build:
;   "C:\Program Files (x86)\Inno Setup 6\ISCC.exe" /DAppVersion=0.1.0 /DSourceDir=dist\Cachet /DOutputDir=dist packaging\windows\cachet.iss
;
; It installs for the current user (no administrator rights needed; "Install for all users" is offered
; too) into %LOCALAPPDATA%\Programs\Cachet. Chats, settings and the model cache live in the user's
; own folders (%LOCALAPPDATA%\Cachet), never in the program folder, and uninstalling leaves them.

#ifndef AppVersion
  #define AppVersion "0.1.0"
#endif
#ifndef SourceDir
  #define SourceDir "..\..\dist\Cachet"
#endif
#ifndef OutputDir
  #define OutputDir "..\..\dist"
#endif

[Setup]
AppId={{6F1C3B52-8E0A-4C39-9A7E-CA0C4E7C1A13}
AppName=Cachet
AppVersion={#AppVersion}
AppVerName=Cachet {#AppVersion}
AppPublisher=Cachet
AppComments=Chat with local language models; every conversation keeps its KV cache.
DefaultDirName={autopf}\Cachet
DefaultGroupName=Cachet
DisableProgramGroupPage=yes
PrivilegesRequired=lowest
PrivilegesRequiredOverridesAllowed=dialog
ArchitecturesAllowed=x64compatible
ArchitecturesInstallIn64BitMode=x64compatible
OutputDir={#OutputDir}
OutputBaseFilename=Cachet-{#AppVersion}-setup
SetupIconFile=..\..\resources\icons\cachet.ico
UninstallDisplayIcon={app}\cachet.exe
UninstallDisplayName=Cachet
Compression=lzma2/max
SolidCompression=yes
WizardStyle=modern
CloseApplications=yes

[Languages]
Name: "english"; MessagesFile: "compiler:Default.isl"

[Tasks]
Name: "desktopicon"; Description: "{cm:CreateDesktopIcon}"; GroupDescription: "{cm:AdditionalIcons}"; Flags: unchecked

[Files]
Source: "{#SourceDir}\*"; DestDir: "{app}"; Flags: ignoreversion recursesubdirs createallsubdirs

[Icons]
Name: "{group}\Cachet"; Filename: "{app}\cachet.exe"; Comment: "Chat with local language models"
Name: "{group}\Uninstall Cachet"; Filename: "{uninstallexe}"
Name: "{autodesktop}\Cachet"; Filename: "{app}\cachet.exe"; Tasks: desktopicon

[Run]
Filename: "{app}\cachet.exe"; Description: "{cm:LaunchProgram,Cachet}"; Flags: nowait postinstall skipifsilent

[UninstallDelete]
; only what the installer put there; the user's chats in %LOCALAPPDATA%\Cachet are kept
Type: filesandordirs; Name: "{app}"
