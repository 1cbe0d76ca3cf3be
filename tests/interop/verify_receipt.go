// Command verify_receipt checks fgtrac receipts and consistency proofs with Go's
// golang.org/x/mod/sumdb/note (C2SP signed notes, Ed25519) and
// golang.org/x/mod/sumdb/tlog (RFC 6962 Merkle proofs): an implementation
// that shares no code with fgtrac.
//
// Usage:
//
//	verify_receipt [-key VKEY] receipt     [FILE|-]
//	verify_receipt [-key VKEY] consistency [FILE|-]
//
// The JSON input (stdin when FILE is absent or "-") is one object or a list of
// objects. A receipt is
//
//	{"leaf": b64, "leaf_index": n, "tree_size": n, "inclusion_proof": [b64...],
//	 "checkpoint": signed note, "verifier_key": vkey}
//
// optionally with "member": {"index": i, "members": b64}: then the leaf is an
// event_groups row and the members bytes (fgtrac/members/v1) must hash to its
// "members" digest and hold "size" members, i among them;
// and a consistency proof is
//
//	{"old_checkpoint": signed note, "new_checkpoint": signed note,
//	 "proof": [b64...], "verifier_key": vkey}
//
// With -key, only that trusted verifier key is used; the input's own
// "verifier_key" is ignored. Receipts whose "kind" is present and not
// "inclusion" are skipped with a note on stderr.
//
// Exit status: 0 and "OK" on stdout when everything verified; 1 and a
// one-line reason on stdout when something is rejected; 2 for usage errors;
// 3 when the input held nothing to verify (empty list, or every receipt skipped).
//
// Build offline in GOPATH mode against Debian's golang-golang-x-mod-dev:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode CGO_ENABLED=0 GOCACHE=$(mktemp -d) \
//	    go build -o verify_receipt tests/interop/verify_receipt.go
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

const (
	exitOK       = 0
	exitRejected = 1
	exitUsage    = 2
	exitNothing  = 3
)

type receipt struct {
	Kind           *string   `json:"kind"`
	Leaf           *string   `json:"leaf"`
	LeafIndex      *int64    `json:"leaf_index"`
	TreeSize       *int64    `json:"tree_size"`
	InclusionProof *[]string `json:"inclusion_proof"`
	Checkpoint     *string   `json:"checkpoint"`
	VerifierKey    *string   `json:"verifier_key"`
	Member         *member   `json:"member"`
}

type member struct {
	Index   *int64  `json:"index"`
	Members *string `json:"members"`
}

type consistency struct {
	OldCheckpoint *string   `json:"old_checkpoint"`
	NewCheckpoint *string   `json:"new_checkpoint"`
	Proof         *[]string `json:"proof"`
	VerifierKey   *string   `json:"verifier_key"`
	// Optional; checked against the checkpoints when present.
	OldSize *int64 `json:"old_size"`
	NewSize *int64 `json:"new_size"`
}

// checkpoint is a parsed C2SP tlog-checkpoint body.
type checkpoint struct {
	origin string
	size   int64
	root   tlog.Hash
}

var decimal = regexp.MustCompile(`^(0|[1-9][0-9]*)$`)

// parseCheckpoint parses "origin\nsize\nbase64(root)\n[extension lines\n]".
func parseCheckpoint(text string) (checkpoint, error) {
	var c checkpoint
	if !strings.HasSuffix(text, "\n") {
		return c, errors.New("checkpoint body does not end with a newline")
	}
	lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
	if len(lines) < 3 {
		return c, fmt.Errorf("checkpoint body has %d lines, want at least 3", len(lines))
	}
	if lines[0] == "" {
		return c, errors.New("checkpoint origin line is empty")
	}
	for _, ext := range lines[3:] {
		if ext == "" {
			return c, errors.New("checkpoint has an empty extension line")
		}
	}
	if !decimal.MatchString(lines[1]) {
		return c, fmt.Errorf("checkpoint tree size %q is not a decimal number", lines[1])
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil {
		return c, fmt.Errorf("checkpoint tree size %q: %v", lines[1], err)
	}
	root, err := decodeHash(lines[2])
	if err != nil {
		return c, fmt.Errorf("checkpoint root: %v", err)
	}
	return checkpoint{origin: lines[0], size: size, root: root}, nil
}

// decodeB64 is strict standard base64 (Go's decoder would skip CR/LF).
func decodeB64(s string) ([]byte, error) {
	if strings.ContainsAny(s, "\r\n") {
		return nil, errors.New("base64 contains a line break")
	}
	return base64.StdEncoding.DecodeString(s)
}

func decodeHash(s string) (tlog.Hash, error) {
	var h tlog.Hash
	b, err := decodeB64(s)
	if err != nil {
		return h, fmt.Errorf("bad base64: %v", err)
	}
	if len(b) != tlog.HashSize {
		return h, fmt.Errorf("hash is %d bytes, want %d", len(b), tlog.HashSize)
	}
	copy(h[:], b)
	return h, nil
}

func decodeProof(elems []string) ([]tlog.Hash, error) {
	out := make([]tlog.Hash, len(elems))
	for i, s := range elems {
		h, err := decodeHash(s)
		if err != nil {
			return nil, fmt.Errorf("proof element %d: %v", i, err)
		}
		out[i] = h
	}
	return out, nil
}

// chooseKey returns the trusted key when one was given on the command line,
// otherwise the input's own verifier key.
func chooseKey(trusted string, own *string) (string, error) {
	if trusted != "" {
		return trusted, nil
	}
	if own == nil || *own == "" {
		return "", errors.New("missing verifier_key (and no -key given)")
	}
	return *own, nil
}

// openCheckpoint verifies the signed note with vkey and parses its body.
func openCheckpoint(signed, vkey string) (checkpoint, error) {
	v, err := note.NewVerifier(vkey)
	if err != nil {
		return checkpoint{}, fmt.Errorf("verifier key: %v", err)
	}
	n, err := note.Open([]byte(signed), note.VerifierList(v))
	if err != nil {
		return checkpoint{}, fmt.Errorf("signed note: %v", err)
	}
	return parseCheckpoint(n.Text)
}

func verifyReceipt(r receipt, trusted string) error {
	switch {
	case r.Leaf == nil:
		return errors.New("missing leaf")
	case r.LeafIndex == nil:
		return errors.New("missing leaf_index")
	case r.TreeSize == nil:
		return errors.New("missing tree_size")
	case r.InclusionProof == nil:
		return errors.New("missing inclusion_proof")
	case r.Checkpoint == nil:
		return errors.New("missing checkpoint")
	}
	vkey, err := chooseKey(trusted, r.VerifierKey)
	if err != nil {
		return err
	}
	cp, err := openCheckpoint(*r.Checkpoint, vkey)
	if err != nil {
		return err
	}
	if cp.size != *r.TreeSize {
		return fmt.Errorf("tree_size %d does not match the checkpoint's size %d", *r.TreeSize, cp.size)
	}
	leaf, err := decodeB64(*r.Leaf)
	if err != nil {
		return fmt.Errorf("leaf: bad base64: %v", err)
	}
	proof, err := decodeProof(*r.InclusionProof)
	if err != nil {
		return fmt.Errorf("inclusion_proof: %v", err)
	}
	if err := tlog.CheckRecord(proof, cp.size, cp.root, *r.LeafIndex, tlog.RecordHash(leaf)); err != nil {
		return fmt.Errorf("inclusion proof of leaf %d in tree %d: %v", *r.LeafIndex, cp.size, err)
	}
	if r.Member != nil {
		return verifyMember(leaf, *r.Member)
	}
	return nil
}

// verifyMember checks a member receipt's members bytes against its (already included) group leaf.
func verifyMember(leaf []byte, m member) error {
	if m.Index == nil || m.Members == nil {
		return errors.New("member: needs index and members")
	}
	var group struct {
		Table   string `json:"table"`
		Members string `json:"members"`
		Size    int64  `json:"size"`
	}
	if err := json.Unmarshal(leaf, &group); err != nil || group.Table != "event_groups" {
		return errors.New("member: the leaf is not an event_groups row")
	}
	data, err := decodeB64(*m.Members)
	if err != nil {
		return fmt.Errorf("member.members: bad base64: %v", err)
	}
	sum := sha256.Sum256(data)
	if hex.EncodeToString(sum[:]) != group.Members {
		return errors.New("member: the members bytes do not hash to the group's members digest")
	}
	magic := []byte("fgtrac/members/v1\n")
	if !bytes.HasPrefix(data, magic) || len(data) < len(magic)+4 {
		return errors.New("member: members bytes lack the fgtrac/members/v1 header")
	}
	n := int64(binary.BigEndian.Uint32(data[len(magic):]))
	if n != group.Size || *m.Index < 0 || *m.Index >= n {
		return fmt.Errorf("member: index %d outside the group's %d members", *m.Index, group.Size)
	}
	return nil
}

func verifyConsistency(c consistency, trusted string) error {
	switch {
	case c.OldCheckpoint == nil:
		return errors.New("missing old_checkpoint")
	case c.NewCheckpoint == nil:
		return errors.New("missing new_checkpoint")
	case c.Proof == nil:
		return errors.New("missing proof")
	}
	vkey, err := chooseKey(trusted, c.VerifierKey)
	if err != nil {
		return err
	}
	oldCp, err := openCheckpoint(*c.OldCheckpoint, vkey)
	if err != nil {
		return fmt.Errorf("old_checkpoint: %v", err)
	}
	newCp, err := openCheckpoint(*c.NewCheckpoint, vkey)
	if err != nil {
		return fmt.Errorf("new_checkpoint: %v", err)
	}
	if oldCp.origin != newCp.origin {
		return fmt.Errorf("checkpoints are from different logs: %q and %q", oldCp.origin, newCp.origin)
	}
	if c.OldSize != nil && *c.OldSize != oldCp.size {
		return fmt.Errorf("old_size %d does not match the old checkpoint's size %d", *c.OldSize, oldCp.size)
	}
	if c.NewSize != nil && *c.NewSize != newCp.size {
		return fmt.Errorf("new_size %d does not match the new checkpoint's size %d", *c.NewSize, newCp.size)
	}
	proof, err := decodeProof(*c.Proof)
	if err != nil {
		return fmt.Errorf("proof: %v", err)
	}
	if oldCp.size > newCp.size {
		return fmt.Errorf("old size %d is larger than new size %d", oldCp.size, newCp.size)
	}
	if oldCp.size == 0 {
		// tlog.CheckTree rejects n == 0; every tree extends the empty tree (RFC 9162 2.1.4.2).
		if len(proof) != 0 {
			return errors.New("consistency proof from the empty tree must be empty")
		}
		if oldCp.root != tlog.Hash(sha256Empty) {
			return errors.New("old checkpoint of size 0 does not carry the empty-tree hash")
		}
		return nil
	}
	if err := tlog.CheckTree(proof, newCp.size, newCp.root, oldCp.size, oldCp.root); err != nil {
		return fmt.Errorf("consistency proof %d -> %d: %v", oldCp.size, newCp.size, err)
	}
	return nil
}

// SHA-256 of the empty string: the RFC 6962 hash of the empty tree.
var sha256Empty = [32]byte{
	0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24,
	0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
}

// splitInput returns the JSON objects of a single object or a list of them.
func splitInput(data []byte) ([]json.RawMessage, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		return nil, fmt.Errorf("input is not JSON: %v", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("input has data after the JSON value")
	}
	trimmed := bytes.TrimSpace(raw)
	switch {
	case len(trimmed) > 0 && trimmed[0] == '{':
		return []json.RawMessage{raw}, nil
	case len(trimmed) > 0 && trimmed[0] == '[':
		var list []json.RawMessage
		if err := json.Unmarshal(raw, &list); err != nil {
			return nil, fmt.Errorf("input list: %v", err)
		}
		for i, item := range list {
			t := bytes.TrimSpace(item)
			if len(t) == 0 || t[0] != '{' {
				return nil, fmt.Errorf("input list item %d is not a JSON object", i)
			}
		}
		return list, nil
	}
	return nil, errors.New("input must be a JSON object or a list of objects")
}

func run(mode, trusted string, data []byte) (int, string) {
	items, err := splitInput(data)
	if err != nil {
		return exitRejected, err.Error()
	}
	verified, skipped := 0, 0
	for i, item := range items {
		label := fmt.Sprintf("%s %d", mode, i)
		switch mode {
		case "receipt":
			var r receipt
			if err := json.Unmarshal(item, &r); err != nil {
				return exitRejected, fmt.Sprintf("%s: malformed: %v", label, err)
			}
			if r.Kind != nil && *r.Kind != "inclusion" {
				fmt.Fprintf(os.Stderr, "skipped %s: kind %q is not checked by this verifier\n", label, *r.Kind)
				skipped++
				continue
			}
			if err := verifyReceipt(r, trusted); err != nil {
				return exitRejected, fmt.Sprintf("%s: %v", label, err)
			}
		case "consistency":
			var c consistency
			if err := json.Unmarshal(item, &c); err != nil {
				return exitRejected, fmt.Sprintf("%s: malformed: %v", label, err)
			}
			if err := verifyConsistency(c, trusted); err != nil {
				return exitRejected, fmt.Sprintf("%s: %v", label, err)
			}
		}
		verified++
	}
	if verified == 0 {
		return exitNothing, fmt.Sprintf("nothing verified (%d items, %d skipped)", len(items), skipped)
	}
	return exitOK, "OK"
}

func usage(msg string) {
	fmt.Fprintf(os.Stderr, "verify_receipt: %s\nusage: verify_receipt [-key VKEY] receipt|consistency [FILE|-]\n", msg)
	os.Exit(exitUsage)
}

func main() {
	var trusted string
	var pos []string
	args := os.Args[1:]
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "-key" || a == "--key":
			if i+1 >= len(args) {
				usage("-key needs a verifier key")
			}
			i++
			trusted = args[i]
		case strings.HasPrefix(a, "-key=") || strings.HasPrefix(a, "--key="):
			trusted = a[strings.Index(a, "=")+1:]
		case a == "-h" || a == "--help" || a == "-help":
			usage("help")
		case a != "-" && strings.HasPrefix(a, "-"):
			usage("unknown flag " + a)
		default:
			pos = append(pos, a)
		}
	}
	if len(pos) < 1 || len(pos) > 2 {
		usage("want a mode and at most one input file")
	}
	mode := pos[0]
	if mode != "receipt" && mode != "consistency" {
		usage("unknown mode " + strconv.Quote(mode))
	}
	if trusted != "" {
		if _, err := note.NewVerifier(trusted); err != nil {
			usage("bad -key: " + err.Error())
		}
	}
	var data []byte
	var err error
	if len(pos) == 2 && pos[1] != "-" {
		data, err = os.ReadFile(pos[1])
	} else {
		data, err = io.ReadAll(os.Stdin)
	}
	if err != nil {
		usage("cannot read input: " + err.Error())
	}
	code, msg := run(mode, trusted, data)
	fmt.Println(msg)
	os.Exit(code)
}
