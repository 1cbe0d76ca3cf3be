// Command read_tiles checks a C2SP tlog-tiles log (a directory or an http://
// prefix) and C2SP tlog-proof files with Go's golang.org/x/mod/sumdb/note and
// golang.org/x/mod/sumdb/tlog: an implementation that shares no code with fgtrac.
//
// Usage:
//
//	read_tiles -key VKEY tiles DIR|URL
//	read_tiles -key VKEY [-witness VKEY ... -quorum K] proof FILE.tlog-proof LEAF_FILE
//
// tiles: verifies the checkpoint's signature (the key's name must be the
// checkpoint's origin), reads every tile and entry bundle the checkpoint's tree
// size publishes at its C2SP path (tile/<L>/<N>[.p/<W>], tile/entries/<N>[.p/<W>]:
// x/mod's Tile.Path is sumdb's layout, so the paths are written here; a missing
// partial tile is read from its full tile, as the spec allows clients), and
//
//   - authenticates every hash of every tile itself: the level-0 hashes give the
//     checkpoint's root, and each hash at level L >= 1 is the Merkle hash of its
//     256 children at level L-1 (x/mod 0.7.0's TileHashReader alone misses some
//     tiles when several root subtrees share a tile, e.g. at tree size 70,000);
//   - reads the tree hash and every leaf hash through tlog.TileHashReader and
//     checks them, and an inclusion proof per tile, with tlog.ProveRecord/CheckRecord;
//   - checks that every entry of every bundle hashes (tlog.RecordHash) to its
//     level-0 tile hash, and that each bundle holds exactly its width.
//
// With -xmod-only, tiles relies on tlog.TileHashReader alone: the tree hash and
// every leaf hash read through it without error is all it asks (no own
// authentication, no proofs, no bundles); it exists to show x/mod's gap.
//
// proof: parses the tlog-proof@v1 file, verifies the checkpoint signature and
// origin, and the inclusion of SHA-256(0x00 || leaf) with tlog.CheckRecord; with
// -witness keys (C2SP tlog-cosignature/v1, key type 0x04), at least -quorum of
// them must have a cosignature line on the checkpoint that verifies with
// crypto/ed25519 (x/mod's note knows key type 0x01 only).
//
// Exit status: 0 and "OK ..." on stdout when everything verified; 1 and
// "FAIL <one-line reason>" when something is rejected; 2 for usage errors.
package main

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

const (
	tileHeight = 8
	tileWidth  = 1 << tileHeight
	maxFile    = 64 << 20
)

var decimal = regexp.MustCompile(`^(0|[1-9][0-9]*)$`)

func usage() {
	fmt.Fprintln(os.Stderr, "usage: read_tiles -key VKEY [-xmod-only] tiles DIR|URL")
	fmt.Fprintln(os.Stderr, "       read_tiles -key VKEY proof FILE.tlog-proof LEAF_FILE")
	os.Exit(2)
}

type keyList []string

func (k *keyList) String() string     { return strings.Join(*k, ",") }
func (k *keyList) Set(s string) error { *k = append(*k, s); return nil }

func main() {
	key := flag.String("key", "", "the log's verifier key")
	xmodOnly := flag.Bool("xmod-only", false, "tiles: rely on tlog.TileHashReader alone")
	var witnesses keyList
	flag.Var(&witnesses, "witness", "proof: a witness's cosignature verifier key (repeatable)")
	quorum := flag.Int("quorum", 0, "proof: how many of the -witness keys must have cosigned")
	flag.Usage = usage
	flag.Parse()
	args := flag.Args()
	if *key == "" || len(args) < 2 {
		usage()
	}
	v, err := note.NewVerifier(*key)
	if err != nil {
		fmt.Fprintf(os.Stderr, "verifier key: %v\n", err)
		os.Exit(2)
	}
	var msg string
	switch {
	case args[0] == "tiles" && len(args) == 2:
		msg, err = checkTiles(newFetcher(args[1]), v, *xmodOnly)
	case args[0] == "proof" && len(args) == 3:
		msg, err = checkProofFile(args[1], args[2], v, witnesses, *quorum)
	default:
		usage()
	}
	if err != nil {
		fmt.Println("FAIL " + strings.ReplaceAll(err.Error(), "\n", " "))
		os.Exit(1)
	}
	fmt.Println("OK " + msg)
}

// --- C2SP paths ---------------------------------------------------------------

// indexPath encodes a tile index as 3-digit groups, all but the last prefixed with x.
func indexPath(n int64) string {
	s := fmt.Sprintf("%03d", n%1000)
	for n /= 1000; n > 0; n /= 1000 {
		s = fmt.Sprintf("x%03d/%s", n%1000, s)
	}
	return s
}

// tilePath is the C2SP tlog-tiles path of t; level -1 is the entry bundle.
func tilePath(t tlog.Tile) string {
	level := strconv.Itoa(t.L)
	if t.L == -1 {
		level = "entries"
	}
	p := "tile/" + level + "/" + indexPath(t.N)
	if t.W != 1<<uint(t.H) {
		p += fmt.Sprintf(".p/%d", t.W)
	}
	return p
}

// --- reading ------------------------------------------------------------------

type fetcher struct {
	base   string
	remote bool
	client    *http.Client
	reads     int
	fallbacks int
}

func newFetcher(base string) *fetcher {
	remote := strings.HasPrefix(base, "http://") || strings.HasPrefix(base, "https://")
	return &fetcher{base: strings.TrimSuffix(base, "/"), remote: remote, client: &http.Client{Timeout: 30 * time.Second}}
}

func (f *fetcher) get(path string) ([]byte, error) {
	f.reads++
	if !f.remote {
		data, err := os.ReadFile(filepath.Join(f.base, filepath.FromSlash(path)))
		if err != nil {
			return nil, fmt.Errorf("%s: %v", path, err)
		}
		return data, nil
	}
	resp, err := f.client.Get(f.base + "/" + path)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: HTTP %s", path, resp.Status)
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxFile+1))
	if err != nil || len(data) > maxFile {
		return nil, fmt.Errorf("%s: cannot read the body (%v)", path, err)
	}
	return data, nil
}

// getTile reads a tile or entry bundle; a missing partial one is read as its full
// tile instead, as C2SP tlog-tiles lets a client do once the log has the full one.
func (f *fetcher) getTile(t tlog.Tile) (data []byte, full bool, err error) {
	data, err = f.get(tilePath(t))
	if err == nil || t.W == 1<<uint(t.H) {
		return data, false, err
	}
	whole := t
	whole.W = 1 << uint(t.H)
	data, ferr := f.get(tilePath(whole))
	if ferr != nil {
		return nil, false, err
	}
	f.fallbacks++
	return data, true, nil
}

// tileReader is a tlog.TileReader over the C2SP paths.
type tileReader struct {
	f     *fetcher
	cache map[tlog.Tile][]byte
}

func (r *tileReader) Height() int { return tileHeight }

func (r *tileReader) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(tiles))
	for i, t := range tiles {
		data, ok := r.cache[t]
		if !ok {
			d, full, err := r.f.getTile(t)
			if err != nil {
				return nil, err
			}
			if full && len(d) == tileWidth*tlog.HashSize {
				d = d[:t.W*tlog.HashSize]
			}
			data = d
			r.cache[t] = data
		}
		out[i] = data
	}
	return out, nil
}

func (r *tileReader) SaveTiles(tiles []tlog.Tile, data [][]byte) {}

// --- checkpoints ----------------------------------------------------------------

type checkpoint struct {
	origin string
	size   int64
	root   tlog.Hash
}

func parseCheckpoint(text string) (checkpoint, error) {
	var c checkpoint
	lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
	if !strings.HasSuffix(text, "\n") || len(lines) < 3 || lines[0] == "" {
		return c, errors.New("checkpoint body is not origin, size and root lines")
	}
	if !decimal.MatchString(lines[1]) {
		return c, fmt.Errorf("checkpoint tree size %q is not a decimal number", lines[1])
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		return c, fmt.Errorf("checkpoint tree size: %v", err)
	}
	root, err := decodeHash(lines[2])
	if err != nil {
		return c, fmt.Errorf("checkpoint root: %v", err)
	}
	return checkpoint{lines[0], size, root}, nil
}

func decodeHash(s string) (tlog.Hash, error) {
	var h tlog.Hash
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil || strings.ContainsAny(s, "\r\n") {
		return h, fmt.Errorf("bad base64 %q", s)
	}
	if len(b) != tlog.HashSize {
		return h, fmt.Errorf("hash is %d bytes, want %d", len(b), tlog.HashSize)
	}
	copy(h[:], b)
	return h, nil
}

// openCheckpoint verifies the log's signature (x/mod's note: Ed25519, type 0x01) and the origin.
func openCheckpoint(signed []byte, v note.Verifier) (checkpoint, error) {
	n, err := note.Open(signed, note.VerifierList(v))
	if err != nil {
		return checkpoint{}, fmt.Errorf("checkpoint signature: %v", err)
	}
	c, err := parseCheckpoint(n.Text)
	if err != nil {
		return c, err
	}
	if c.origin != v.Name() {
		return c, fmt.Errorf("checkpoint origin %q is not the key's name %q", c.origin, v.Name())
	}
	return c, nil
}

// --- the tiles check -------------------------------------------------------------

// subtreeHash is the Merkle hash of a perfect subtree over hashes (a power of two of them).
func subtreeHash(hashes []tlog.Hash) tlog.Hash {
	if len(hashes) == 1 {
		return hashes[0]
	}
	return tlog.NodeHash(subtreeHash(hashes[:len(hashes)/2]), subtreeHash(hashes[len(hashes)/2:]))
}

// treeHash is RFC 6962 MTH over leaf hashes: the largest power of two below n on the left.
func treeHash(hashes []tlog.Hash) tlog.Hash {
	n := len(hashes)
	if n == 1 {
		return hashes[0]
	}
	k := 1
	for k*2 < n {
		k *= 2
	}
	return tlog.NodeHash(treeHash(hashes[:k]), treeHash(hashes[k:]))
}

func splitHashes(data []byte) []tlog.Hash {
	out := make([]tlog.Hash, len(data)/tlog.HashSize)
	for i := range out {
		copy(out[i][:], data[i*tlog.HashSize:])
	}
	return out
}

func checkTiles(f *fetcher, v note.Verifier, xmodOnly bool) (string, error) {
	signed, err := f.get("checkpoint")
	if err != nil {
		return "", err
	}
	c, err := openCheckpoint(signed, v)
	if err != nil {
		return "", err
	}
	if c.size == 0 {
		return "tree size 0", nil
	}
	tree := tlog.Tree{N: c.size, Hash: c.root}
	tr := &tileReader{f: f, cache: map[tlog.Tile][]byte{}}

	// Read every published tile, level by level; levels[L][i] is the i-th hash of tile level L.
	var levels [][]tlog.Hash
	tiles := 0
	for L := 0; c.size>>(tileHeight*uint(L)) > 0; L++ {
		count := c.size >> (tileHeight * uint(L))
		var level []tlog.Hash
		for k := int64(0); k*tileWidth < count; k++ {
			w := count - k*tileWidth
			if w > tileWidth {
				w = tileWidth
			}
			t := tlog.Tile{H: tileHeight, L: L, N: k, W: int(w)}
			data, err := tr.ReadTiles([]tlog.Tile{t})
			if err != nil {
				return "", err
			}
			if len(data[0]) != int(w)*tlog.HashSize {
				return "", fmt.Errorf("%s is %d bytes, want %d", tilePath(t), len(data[0]), int(w)*tlog.HashSize)
			}
			level = append(level, splitHashes(data[0])...)
			tiles++
		}
		levels = append(levels, level)
	}

	if !xmodOnly {
		// Authenticate every hash ourselves: level 0 against the root, each upper hash against its children.
		if treeHash(levels[0]) != c.root {
			return "", errors.New("the level-0 tiles do not hash to the checkpoint's root")
		}
		for L := 1; L < len(levels); L++ {
			for i, h := range levels[L] {
				if subtreeHash(levels[L-1][i*tileWidth:(i+1)*tileWidth]) != h {
					return "", fmt.Errorf("hash %d of %s is not the hash of its 256 children at level %d",
						i%tileWidth, tilePath(tlog.Tile{H: tileHeight, L: L, N: int64(i / tileWidth), W: tileWidth}), L-1)
				}
			}
		}
	}

	// x/mod's own reading of the same tiles.
	hr := tlog.TileHashReader(tree, tr)
	th, err := tlog.TreeHash(c.size, hr)
	if err != nil {
		return "", fmt.Errorf("tlog.TreeHash: %v", err)
	}
	if th != c.root {
		return "", errors.New("tlog.TreeHash over the tiles is not the checkpoint's root")
	}
	for lo := int64(0); lo < c.size; lo += 4096 {
		var idx []int64
		for i := lo; i < lo+4096 && i < c.size; i++ {
			idx = append(idx, tlog.StoredHashIndex(0, i))
		}
		got, err := hr.ReadHashes(idx)
		if err != nil {
			return "", fmt.Errorf("tlog.TileHashReader: %v", err)
		}
		if !xmodOnly { // with -xmod-only, x/mod's word is taken for each of them
			for j, h := range got {
				if h != levels[0][lo+int64(j)] {
					return "", fmt.Errorf("tlog.TileHashReader's leaf hash %d differs from the tile's", lo+int64(j))
				}
			}
		}
	}
	if xmodOnly {
		return fmt.Sprintf("tree size %d: x/mod's TileHashReader returned every leaf hash of %d tiles without error "+
			"(nothing else checked)", c.size, tiles), nil
	}
	for i := int64(0); i < c.size; i += tileWidth + 1 {
		for _, x := range []int64{i, c.size - 1 - i} {
			if x < 0 {
				continue
			}
			p, err := tlog.ProveRecord(c.size, x, hr)
			if err != nil {
				return "", fmt.Errorf("tlog.ProveRecord(%d, %d): %v", c.size, x, err)
			}
			if err := tlog.CheckRecord(p, c.size, c.root, x, levels[0][x]); err != nil {
				return "", fmt.Errorf("tlog.CheckRecord(%d): %v", x, err)
			}
		}
	}

	bundles := 0
	for k := int64(0); k*tileWidth < c.size; k++ {
		w := c.size - k*tileWidth
		if w > tileWidth {
			w = tileWidth
		}
		t := tlog.Tile{H: tileHeight, L: -1, N: k, W: int(w)}
		data, full, err := f.getTile(t)
		if err != nil {
			return "", err
		}
		entries, err := parseBundle(data)
		if err != nil {
			return "", fmt.Errorf("%s: %v", tilePath(t), err)
		}
		if full && len(entries) == tileWidth {
			entries = entries[:w]
		}
		if len(entries) != int(w) {
			return "", fmt.Errorf("%s holds %d entries, want %d", tilePath(t), len(entries), w)
		}
		for i, e := range entries {
			if tlog.RecordHash(e) != levels[0][k*tileWidth+int64(i)] {
				return "", fmt.Errorf("entry %d of %s does not hash to its level-0 tile hash", i, tilePath(t))
			}
		}
		bundles++
	}
	return fmt.Sprintf("tree size %d: %d tiles and %d entry bundles authenticated (%d reads, %d full tiles read "+
		"for partial ones)", c.size, tiles, bundles, f.reads, f.fallbacks), nil
}

// parseBundle splits a C2SP entry bundle: big-endian uint16 length-prefixed entries.
func parseBundle(data []byte) ([][]byte, error) {
	var out [][]byte
	for pos := 0; pos < len(data); {
		if pos+2 > len(data) {
			return nil, fmt.Errorf("ends inside a length prefix at byte %d", pos)
		}
		n := int(binary.BigEndian.Uint16(data[pos:]))
		if pos+2+n > len(data) {
			return nil, fmt.Errorf("entry %d runs past the end", len(out))
		}
		out = append(out, data[pos+2:pos+2+n])
		pos += 2 + n
	}
	return out, nil
}

// --- tlog-proof -------------------------------------------------------------------

// parseProof reads c2sp.org/tlog-proof@v1: header, [extra], index, hashes, empty line, checkpoint.
func parseProof(text []byte) (index int64, proof tlog.RecordProof, signed []byte, err error) {
	head, rest, ok := bytes.Cut(text, []byte("\n\n"))
	if !ok {
		return 0, nil, nil, errors.New("tlog-proof has no empty line before the checkpoint")
	}
	lines := strings.Split(string(head), "\n")
	if lines[0] != "c2sp.org/tlog-proof@v1" {
		return 0, nil, nil, errors.New("tlog-proof: missing header line")
	}
	lines = lines[1:]
	if len(lines) > 0 && strings.HasPrefix(lines[0], "extra ") {
		if _, err := base64.StdEncoding.Strict().DecodeString(lines[0][len("extra "):]); err != nil {
			return 0, nil, nil, errors.New("tlog-proof: extra data is not base64")
		}
		lines = lines[1:]
	}
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "index ") || !decimal.MatchString(lines[0][len("index "):]) {
		return 0, nil, nil, errors.New("tlog-proof: missing `index N` line")
	}
	if index, err = strconv.ParseInt(lines[0][len("index "):], 10, 64); err != nil {
		return 0, nil, nil, fmt.Errorf("tlog-proof index: %v", err)
	}
	for i, l := range lines[1:] {
		h, err := decodeHash(l)
		if err != nil {
			return 0, nil, nil, fmt.Errorf("tlog-proof hash %d: %v", i, err)
		}
		proof = append(proof, h)
	}
	return index, proof, rest, nil
}

// cosigners returns how many of the witness keys (name+hexid+base64(0x04||pub)) have a
// cosignature line on the signed note that verifies: Ed25519 over
// "cosignature/v1\ntime T\n" || text, the line's blob being keyid(4) || T(8, big-endian) || sig(64).
func cosigners(signed []byte, witnesses []string) (int, error) {
	head, sigs, ok := bytes.Cut(signed, []byte("\n\n"))
	if !ok {
		return 0, errors.New("checkpoint note has no signature block")
	}
	text := append(append([]byte{}, head...), '\n')
	count := 0
	for _, w := range witnesses {
		parts := strings.SplitN(w, "+", 3)
		if len(parts) != 3 {
			return 0, fmt.Errorf("malformed witness key %q", w)
		}
		raw, err := base64.StdEncoding.Strict().DecodeString(parts[2])
		if err != nil || len(raw) != 1+ed25519.PublicKeySize || raw[0] != 0x04 {
			return 0, fmt.Errorf("witness key %q is not an Ed25519 cosignature key (type 0x04)", w)
		}
		id, err := strconv.ParseUint(parts[1], 16, 32)
		if err != nil {
			return 0, fmt.Errorf("witness key %q: bad key id", w)
		}
		h := sha256.Sum256(append([]byte(parts[0]+"\n"), raw...))
		if binary.BigEndian.Uint32(h[:4]) != uint32(id) {
			return 0, fmt.Errorf("witness key %q: key id does not match the key", w)
		}
		for _, line := range strings.Split(strings.TrimSuffix(string(sigs), "\n"), "\n") {
			name, b64, ok := strings.Cut(strings.TrimPrefix(line, "\u2014 "), " ")
			blob, err := base64.StdEncoding.Strict().DecodeString(b64)
			if !ok || name != parts[0] || err != nil || len(blob) != 4+8+ed25519.SignatureSize ||
				binary.BigEndian.Uint32(blob[:4]) != uint32(id) {
				continue
			}
			msg := fmt.Sprintf("cosignature/v1\ntime %d\n%s", binary.BigEndian.Uint64(blob[4:12]), text)
			if ed25519.Verify(ed25519.PublicKey(raw[1:]), []byte(msg), blob[12:]) {
				count++
				break
			}
		}
	}
	return count, nil
}

func checkProofFile(proofPath, leafPath string, v note.Verifier, witnesses []string, quorum int) (string, error) {
	text, err := os.ReadFile(proofPath)
	if err != nil {
		return "", err
	}
	leaf, err := os.ReadFile(leafPath)
	if err != nil {
		return "", err
	}
	index, proof, signed, err := parseProof(text)
	if err != nil {
		return "", err
	}
	c, err := openCheckpoint(signed, v)
	if err != nil {
		return "", err
	}
	if index >= c.size {
		return "", fmt.Errorf("index %d is not below the tree size %d", index, c.size)
	}
	if err := tlog.CheckRecord(proof, c.size, c.root, index, tlog.RecordHash(leaf)); err != nil {
		return "", fmt.Errorf("inclusion: %v", err)
	}
	n, err := cosigners(signed, witnesses)
	if err != nil {
		return "", err
	}
	if n < quorum {
		return "", fmt.Errorf("cosigned by %d of the witnesses, quorum %d", n, quorum)
	}
	return fmt.Sprintf("leaf %d of tree size %d, cosigned by %d witnesses", index, c.size, n), nil
}
