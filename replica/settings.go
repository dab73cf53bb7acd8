package replica

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// RemoteSettings are the server settings a replica was last opened with,
// kept next to it (PATH-remote) so that tools such as `sqlrebase inspect`
// can say where it syncs. The credential is not among them: it is a secret.
type RemoteSettings struct {
	Addr        string   `json:"addr"`
	Alternates  []string `json:"alternates,omitempty"`
	Database    string   `json:"database"`
	Fingerprint string   `json:"fingerprint,omitempty"`
	CAFile      string   `json:"ca_file,omitempty"`
	ServerName  string   `json:"server_name,omitempty"`
}

func settingsPath(path string) string { return path + "-remote" }

func settingsOf(rm *Remote) RemoteSettings {
	return RemoteSettings{Addr: rm.Addr, Alternates: rm.Alternates, Database: rm.Database, Fingerprint: rm.Fingerprint, CAFile: rm.CAFile, ServerName: rm.ServerName}
}

// writeSettings records rm's settings, if they changed, atomically.
func writeSettings(path string, rm *Remote) error {
	b, err := json.MarshalIndent(settingsOf(rm), "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if old, err := os.ReadFile(settingsPath(path)); err == nil && bytes.Equal(old, b) {
		return nil
	}
	tmp := settingsPath(path) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return fmt.Errorf("write remote settings: %w", err)
	}
	if err := os.Rename(tmp, settingsPath(path)); err != nil {
		return fmt.Errorf("write remote settings: %w", err)
	}
	return nil
}

// ErrNoRemoteSettings is returned by ReadRemoteSettings for a replica that
// was never opened with a Remote.
var ErrNoRemoteSettings = errors.New("replica: no remote settings recorded")

// ReadRemoteSettings returns the server settings the replica at path was
// last opened with. It does not open the replica.
func ReadRemoteSettings(path string) (RemoteSettings, error) {
	b, err := os.ReadFile(settingsPath(path))
	if errors.Is(err, fs.ErrNotExist) {
		return RemoteSettings{}, ErrNoRemoteSettings
	}
	if err != nil {
		return RemoteSettings{}, err
	}
	var s RemoteSettings
	if err := json.Unmarshal(b, &s); err != nil {
		return RemoteSettings{}, fmt.Errorf("replica: remote settings %s: %w", settingsPath(path), err)
	}
	return s, nil
}
